"""What crosses from the CPU actors to the model actors: exact, and compact."""

import numpy as np
import pyarrow as pa
import transformers as tf
from PIL import Image

from pipeline.config import load_config
from pipeline.records import Record
from pipeline.stages import PREPARED_FIELDS, prepared_to_row, row_to_prepared
from tests.conftest import preprocessor, resized


def test_prepared_row_round_trips_and_is_at_most_a_quarter_of_the_processor_output(tiny_llava_next):
    import io

    pre = preprocessor(load_config({"model": {"name": tiny_llava_next}}))
    images = [resized("astronaut", 480, 640), resized("coffee", 300, 900), resized("rocket", 1024, 768)]
    processor = tf.AutoProcessor.from_pretrained(tiny_llava_next)
    ours = theirs = 0
    for i, image in enumerate(images):
        prepared = pre.prepare(Record(id=i, images=[image], prompt="What is this?"))
        row = prepared_to_row(prepared)
        back = row_to_prepared(row, i)
        assert np.array_equal(back.input_ids, prepared.input_ids) and np.array_equal(back.tiles, prepared.tiles)
        assert (back.tiles_per_image, back.image_sizes, back.prompt) == (prepared.tiles_per_image, prepared.image_sizes, prepared.prompt)
        ours += pa.Table.from_pylist([row], schema=pa.schema(PREPARED_FIELDS)).nbytes
        enc = processor(images=[Image.open(io.BytesIO(image))], text=prepared.prompt, return_tensors="np")
        theirs += sum(v.nbytes for v in enc.values())
    assert ours / theirs <= 0.25, ours / theirs
