"""benchmarks/gpu.py's CPU parts (the GPU run itself is in GPU.md's procedure): the full-size
model directory, the rows, and the FLOP count behind the MFU figure."""

import importlib.util
import io

import pyarrow.parquet as pq
import pytest
import torch
import transformers as tf
from PIL import Image

from pipeline.checkpoint import Checkpoint
from pipeline.config import ModelConfig
from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "gpu.py")
gpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu)


@pytest.mark.parametrize("name, image_tokens, prompt", [
    ("llava-1.5-7b", 576, "USER: <image>\nHi ASSISTANT:"),
    ("llava-v1.6-mistral-7b", 2928, "[INST] <image>\nHi [/INST]"),
])
def test_model_dir_is_the_real_architecture_without_weights(tmp_path, name, image_tokens, prompt):
    model_dir = gpu.build_model_dir(name, tmp_path / name)
    assert not list(model_dir.glob("*.safetensors"))
    config = tf.AutoConfig.from_pretrained(model_dir)
    text = gpu.ARCHS[name].text
    assert config.text_config.model_type == text["model_type"]
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers, config.text_config.num_key_value_heads) == (
        text["hidden_size"], text["num_hidden_layers"], text["num_key_value_heads"])
    assert (config.vision_config.hidden_size, config.vision_config.image_size) == (1024, 336)
    processor = tf.AutoProcessor.from_pretrained(model_dir)
    assert len(processor.tokenizer) == config.text_config.vocab_size == gpu.VOCAB  # every id decodes
    assert Checkpoint.load(ModelConfig(name=str(model_dir))).images.max_tokens == image_tokens
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    assert processor.apply_chat_template(chat, add_generation_prompt=True) == prompt

    # The FLOP count's weights are the model's own: count them on the meta device.
    with torch.device("meta"):
        model = getattr(tf, config.architectures[0])(config)
    lm = sum(m.weight.numel() for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and (n.startswith("model.language_model") or n == "lm_head"))
    clip = sum(m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".vision_tower." in f".{n}" and ".encoder.layers.0." in n)
    assert gpu.linear_params(name) == (lm, clip)


def test_rows_are_unique_real_photos_at_camera_sizes(tmp_path):
    table = pq.read_table(gpu.build_rows(30, tmp_path / "rows.parquet")).to_pylist()
    assert len({r["image"] for r in table}) == len({r["id"] for r in table}) == 30
    assert {Image.open(io.BytesIO(r["image"])).size for r in table} <= set(gpu.SIZES)
    assert gpu.tiles_per_row("llava-1.5-7b", tmp_path / "rows.parquet") == [1] * 30
    assert set(gpu.tiles_per_row("llava-v1.6-mistral-7b", tmp_path / "rows.parquet")) <= {3, 4, 5}
