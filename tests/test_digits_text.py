"""The CPU text-to-image testbed (teacher.source: train_text): captions, the CLIP tokenizer
against open_clip's, the prompt-alignment score by hand, a text teacher's pipeline folder read
back by diffusers/transformers with identical outputs, and the teacher stage's kill-and-resume.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import assert_state_dicts_equal, error_lines, run_module, tiny_config, write_config  # noqa: E402

from sida.errors import ConfigError, DataError
from sida.eval.alignment import prompt_alignment
from sida.io import digits_text as dt

TEMPLATES = ["a handwritten {n}", "the digit {w}"]


def _text_config() -> dict:
    cfg = tiny_config()
    cfg["teacher"].update(source="train_text", kimg=0.064, batch=16, tick_kimg=0.032, snapshot_kimg=0.032,
                          lr=1e-3, sample_steps=2,
                          text={"templates": TEMPLATES, "width": 16, "heads": 2, "max_length": 8},
                          unet={"channels": [8, 16], "head_dim": 4, "norm_groups": 4})
    return cfg


# -- captions -----------------------------------------------------------------------------------

def test_captions_by_hand(tmp_path):
    assert dt.caption("a handwritten {n}", 7) == "a handwritten 7"
    assert dt.caption("the digit {w}", 7) == "the digit seven"
    captions, digits = dt.caption_bank(TEMPLATES)
    assert captions[:5] == ["", "a handwritten 0", "the digit zero", "a handwritten 1", "the digit one"]
    assert digits[:5] == [-1, 0, 0, 1, 1] and len(captions) == 21 and captions[-1] == "the digit nine"
    prompts, pd = dt.prompt_set(12, TEMPLATES)
    assert pd == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert prompts[9] == "a handwritten 9" and prompts[10] == "the digit zero" and prompts[11] == "the digit one"
    assert [dt.digit_of_caption(p, TEMPLATES) for p in prompts] == pd
    with pytest.raises(DataError, match="not a caption"):
        dt.digit_of_caption("a cat", TEMPLATES)
    with pytest.raises(DataError, match="not a caption"):
        dt.digit_of_caption("", TEMPLATES)  # the empty caption names no digit
    for bad in (["seven"], ["{n} or {w}"], ["{x} {n}"], []):
        with pytest.raises(ConfigError):
            dt.check_templates(bad)
    path = dt.write_prompts(tmp_path / "prompts.txt", prompts[:3])
    assert path.read_text() == "a handwritten 0\na handwritten 1\na handwritten 2\n"
    with pytest.raises(DataError, match="one line"):
        dt.write_prompts(tmp_path / "bad.txt", ["ok", ""])


def test_caption_draws_keep_the_digit_and_the_empty_share():
    digits = torch.arange(10).repeat(2000)
    idx = dt.draw_caption_indices(digits, len(TEMPLATES), 0.1, torch.Generator().manual_seed(0))
    _, bank_digits = dt.caption_bank(TEMPLATES)
    empty = idx == 0
    assert abs(float(empty.float().mean()) - 0.1) < 0.01  # 20,000 draws: std 0.002
    assert torch.equal(torch.tensor(bank_digits)[idx[~empty]], digits[~empty])
    templates = (idx[~empty] - 1) % len(TEMPLATES)
    assert abs(float(templates.float().mean()) - 0.5) < 0.02  # both templates, uniformly
    none_empty = dt.draw_caption_indices(digits, len(TEMPLATES), 0.0, torch.Generator().manual_seed(0))
    assert bool((none_empty > 0).all())


# -- the alignment score ------------------------------------------------------------------------

def test_prompt_alignment_by_hand():
    probs = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.2, 0.0], [0.3, 0.3, 0.4], [0.2, 0.5, 0.3]])
    # argmax 1, 0, 2, 1 against digits 1, 0, 0, 2: two of four agree
    assert prompt_alignment(probs, [1, 0, 0, 2]) == 0.5
    assert prompt_alignment(probs.log(), torch.tensor([1, 0, 2, 1])) == 1.0  # logits work alike
    with pytest.raises(DataError, match="n digits"):
        prompt_alignment(probs, [1, 0])
    with pytest.raises(DataError, match="0..2"):
        prompt_alignment(probs, [1, 0, 3, -1])


# -- tokenizer and text encoder -----------------------------------------------------------------

def test_tokenizer_matches_open_clip(tmp_path):
    from open_clip.tokenizer import SimpleTokenizer

    from sida.io.clip_text import clip_tokenizer, load_clip_tokenizer, write_clip_tokenizer

    ref = SimpleTokenizer()
    saved = load_clip_tokenizer(write_clip_tokenizer(tmp_path / "tok", 16))
    memory = clip_tokenizer(16)
    texts = dt.caption_bank(dt.DEFAULT_TEMPLATES)[0] + ["A Picture of the NUMBER 10!", "seven's  digits", "café 42"]
    for text in texts:
        want = [ref.sot_token_id] + ref.encode(text) + [ref.eot_token_id]
        assert saved(text).input_ids == want == memory(text).input_ids, text
    assert want[0] == 49406 and want[-1] == 49407 and len(saved) == 49408
    ids = saved(["a handwritten 7"], padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert ids.tolist() == [[49406, 320, 35192, 278] + [49407] * 12]  # padded with <|endoftext|> to 16


def test_text_encoder_is_frozen_seeded_and_checked():
    from sida.io.clip_text import make_text_encoder

    a, b = make_text_encoder(16, 2, 2, 8, seed=5), make_text_encoder(16, 2, 2, 8, seed=5)
    assert_state_dicts_equal(a.state_dict(), b.state_dict())
    assert not any(p.requires_grad for p in a.parameters()) and not a.training
    assert a.config.vocab_size == 49408
    with pytest.raises(ConfigError, match="divide"):
        make_text_encoder(16, 2, 3, 8, seed=0)


# -- the teacher --------------------------------------------------------------------------------

def _tiny_loop(cfg: dict):
    from sida.io.clip_text import clip_tokenizer, make_text_encoder
    from sida.io.data import open_dataset
    from sida.run.dist import init
    from sida.train.text_teacher import TextTeacherLoop, text_unet

    torch.manual_seed(0)
    tok, enc = clip_tokenizer(8), make_text_encoder(16, 2, 2, 8, seed=0)
    loop = TextTeacherLoop(cfg, text_unet(cfg), open_dataset(cfg["data"]), init("cpu", 1), tok, enc, seed=1)
    return loop, tok, enc


def test_text_teacher_loss_is_sds_objective_on_its_draws():
    """The loss of a micro-batch, replayed by hand from the same generator states: x_t is
    diffusers' own add_noise at the drawn integer steps, the condition is the bank row of a
    caption of the image's digit (or the empty one), the loss the per-sample eps MSE."""
    from types import SimpleNamespace

    from sida.run.config import validate

    cfg = validate(_text_config())
    loop, _, _ = _tiny_loop(cfg)
    seen = {}

    def zero_net(x_t, t, encoder_hidden_states):
        seen.update(x_t=x_t, t=t, cond=encoder_hidden_states)
        return SimpleNamespace(sample=torch.zeros_like(x_t))

    data_gen, noise_gen = torch.Generator(), torch.Generator()
    data_gen.set_state(loop.gens["data"].get_state())
    noise_gen.set_state(loop.gens["noise"].get_state())
    loop.net = zero_net
    loss = loop.micro_loss(0)
    x, labels = loop.dataset.get_batch(torch.randint(len(loop.dataset), (16,), generator=data_gen))
    caps = dt.draw_caption_indices(labels.argmax(1), len(TEMPLATES), 0.1, data_gen)
    t = torch.randint(1000, (16,), generator=noise_gen)
    eps = torch.randn(x.shape, generator=noise_gen)
    assert torch.equal(seen["t"], t)
    assert torch.allclose(seen["x_t"], loop.scheduler.add_noise(x, eps, t), atol=1e-6)
    assert torch.equal(seen["cond"], loop.bank[caps])
    _, bank_digits = dt.caption_bank(TEMPLATES)
    assert all(bank_digits[c] in (-1, d) for c, d in zip(caps.tolist(), labels.argmax(1).tolist()))
    assert torch.allclose(loss, eps.square().mean(dim=(1, 2, 3)))  # a zero prediction: mean eps^2


def test_text_teacher_pipeline_reads_back_identically(tmp_path):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from sida.io.text_encoder import TextEncoder
    from sida.io.text_pipeline import load_text_pipeline, save_text_pipeline
    from sida.run.config import validate

    cfg = validate(_text_config())
    text = cfg["teacher"]["text"]
    loop, tok, enc = _tiny_loop(cfg)
    losses = [float(loop.step()["loss"]) for _ in range(3)]
    assert all(0.05 < v < 5 for v in losses), losses  # eps-MSE starts near 1 (unit-variance targets)
    out = save_text_pipeline(tmp_path / "pipeline", loop.ema, enc, loop.scheduler, text["max_length"])
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and not (out / "vae").exists()
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    enc2 = CLIPTextModel.from_pretrained(out / "text_encoder")
    tok2 = CLIPTokenizer.from_pretrained(out / "tokenizer")
    assert tok2.model_max_length == 8
    prompts = ["a handwritten 3", "the digit five", ""]
    cond = TextEncoder(tok, enc).encode(prompts)
    assert cond.shape == (3, 8, 16)
    assert torch.equal(TextEncoder(tok2, enc2).encode(prompts), cond)
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 500, 999])
    with torch.no_grad():
        assert torch.equal(unet(x, t, encoder_hidden_states=cond).sample,
                           loop.ema(x, t, encoder_hidden_states=cond).sample)
    assert DDPMScheduler.from_pretrained(out / "scheduler").config.beta_schedule == "squaredcos_cap_v2"
    assert set(load_text_pipeline(out)) == {"unet", "text_encoder", "tokenizer", "scheduler"}
    with pytest.raises(Exception, match="not a text pipeline folder"):
        load_text_pipeline(tmp_path)


@pytest.mark.slow
def test_text_teacher_stage_kill_and_resume_is_bit_exact(tmp_path):
    from safetensors.torch import load_file

    config = write_config(tmp_path / "config.yaml", _text_config())
    a, b = tmp_path / "a", tmp_path / "b"
    res_a = run_module("stages.teacher", "--config", str(config), "--out", str(a), timeout=240)
    assert res_a.returncode == 0, res_a.stderr[-3000:]
    assert "kimg     0.06/0.1" in res_a.stderr  # progress lines
    killed = run_module("stages.teacher", "--config", str(config), "--out", str(b), timeout=240,
                        SIDA_KILL_AT="checkpointed")  # after 2 of 4 iterations
    assert killed.returncode == -9 and (b / "work" / "state.pt").exists() and not (b / "pipeline").exists()
    res_b = run_module("stages.teacher", "--config", str(config), "--out", str(b), timeout=240)
    assert res_b.returncode == 0 and "resuming" in res_b.stderr, res_b.stderr[-3000:]
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert_state_dicts_equal(load_file(a / "pipeline" / part), load_file(b / "pipeline" / part))
    assert (a / "samples.png").read_bytes() == (b / "samples.png").read_bytes()
    assert (a / "prompts.txt").read_text().splitlines()[:3] == ["a handwritten 0", "a handwritten 1",
                                                                 "a handwritten 2"]
    assert not (b / "work").exists()


def test_text_teacher_bad_config_is_one_line(tmp_path, stage_here):
    cfg = _text_config()
    cfg["data"]["label_dim"] = 0
    code, err = stage_here("stages.teacher", ["--config", str(write_config(tmp_path / "c.yaml", cfg)),
                                              "--out", str(tmp_path / "out")])
    assert code == 1 and len(error_lines(err)) == 1 and "data.label_dim 10" in err, err
