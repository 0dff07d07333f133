#!/usr/bin/env python3
"""Parity fixtures for the Rust port, made with the reference implementation.

Builds tiny random-weight Würstchen components with diffusers / transformers, saves
each in diffusers format together with inputs and the reference outputs, and dumps the
state-dict layout of the official full-size architectures. The Rust tests replay all
of it; Python is needed only to regenerate.

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install -r scripts/requirements.txt
    /tmp/venv/bin/pip install --no-deps open-clip-torch==3.3.0
    /tmp/venv/bin/python scripts/make_fixtures.py            # writes tests/fixtures/

Every fixture folder carries a fixture.json header (versions, this script's version).
"""

import argparse
import gzip
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import diffusers
import transformers
from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel
from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_diffnext import WuerstchenDiffNeXt
from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_prior import WuerstchenPrior
from diffusers.schedulers.scheduling_ddpm_wuerstchen import DDPMWuerstchenScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

SCRIPT_VERSION = 1
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures"

HEADER = {
    "script": "scripts/make_fixtures.py",
    "script_version": SCRIPT_VERSION,
    "regenerate": "python scripts/make_fixtures.py (versions pinned in scripts/requirements.txt)",
    "torch": torch.__version__,
    "diffusers": diffusers.__version__,
    "transformers": transformers.__version__,
}


def write_header(folder: Path, **extra):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fixture.json").write_text(json.dumps({**HEADER, **extra}, indent=2) + "\n")


def redraw_(model: torch.nn.Module, gen: torch.Generator, damp=()):
    """Replace every weight with a seeded draw, so no layer is left at the 0 / 1 its
    initialiser picked (those would hide bugs). Matrices and kernels are scaled by
    fan-in; vectors get a moderate spread. `damp` names output heads kept small so
    the prediction stays well conditioned."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and not name.endswith(("gamma", "beta")):
                fan_in = max(1, p[0].numel())
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            if any(name.startswith(d) for d in damp):
                p.mul_(0.1)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.2)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
    model.eval()
    return model


def save_case(name: str, component: str, model, inputs: dict, output: torch.Tensor, **extra):
    folder = OUT / name
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder / "model", safe_serialization=True)
    save_file({k: v.contiguous() for k, v in inputs.items()}, folder / "inputs.safetensors")
    save_file({"output": output.float().contiguous()}, folder / "expected.safetensors")
    write_header(folder, component=component, **extra)
    print(f"{name}: {component} output {tuple(output.shape)} max|y| {output.abs().max():.3f}")


# ---------------------------------------------------------------- Stage C prior
def prior_cases(gen):
    cases = [
        # name, config, batch, h, w, text length
        ("prior_a", dict(c_in=16, c=32, c_cond=24, c_r=16, depth=2, nhead=4, dropout=0.1), 2, 6, 4, 77),
        ("prior_b", dict(c_in=6, c=48, c_cond=40, c_r=10, depth=3, nhead=3, dropout=0.0), 3, 3, 5, 9),
    ]
    for name, cfg, b, h, w, L in cases:
        model = redraw_(WuerstchenPrior(**cfg), gen, damp=("out.1",))
        x = torch.randn(b, cfg["c_in"], h, w, generator=gen)
        r = torch.tensor([1.0, 0.0, 0.6666667, 0.123, 0.5][:b])
        c = torch.randn(b, L, cfg["c_cond"], generator=gen)
        with torch.no_grad():
            y = model(x, r, c)
        save_case(name, "prior", model, dict(x=x, r=r, c=c), y)
    # classifier-free guidance's batch, as the pipeline makes it: two latents, each
    # twice at its noise level, under the text and under the empty prompt's embeddings
    # (a generator of its own, so the other fixtures keep their draws)
    g = torch.Generator().manual_seed(7)
    cfg = dict(c_in=16, c=32, c_cond=24, c_r=16, depth=2, nhead=4, dropout=0.0)
    model = redraw_(WuerstchenPrior(**cfg), g, damp=("out.1",))
    x = torch.randn(2, cfg["c_in"], 5, 6, generator=g).repeat(2, 1, 1, 1)
    r = torch.tensor([0.75, 0.3, 0.75, 0.3])
    c = torch.randn(4, 77, cfg["c_cond"], generator=g)
    with torch.no_grad():
        y = model(x, r, c)
    save_case("prior_guidance", "prior", model, dict(x=x, r=r, c=c), y)


# ---------------------------------------------------------------- Stage B decoder
def decoder_cases(gen):
    cases = [
        (
            "decoder_a",
            dict(c_in=4, c_out=4, c_r=16, patch_size=2, c_cond=24, c_hidden=[16, 32, 48], nhead=[-1, 4, 6],
                 blocks=[1, 2, 1], level_config=["CT", "CTA", "CTA"], inject_effnet=[False, True, True],
                 effnet_embd=16, clip_embd=20, kernel_size=3, dropout=0.1),
            2, 24, 40, (6, 10), 77,
        ),
        (
            # four levels as the official model, 24 -> 8 x 8 effnet: upsampled at
            # levels 0-1, antialiased downsampling at level 3
            "decoder_b",
            dict(c_in=4, c_out=4, c_r=12, patch_size=2, c_cond=16, c_hidden=[8, 16, 24, 32], nhead=[-1, 2, 4, 8],
                 blocks=[1, 1, 2, 1], level_config=["CT", "CTA", "CTA", "CTA"],
                 inject_effnet=[False, True, True, True], effnet_embd=16, clip_embd=12, kernel_size=3,
                 dropout=[0.0, 0.1, 0.1, 0.1]),
            1, 32, 48, (5, 7), 77,
        ),
        (
            "decoder_c",
            dict(c_in=3, c_out=3, c_r=8, patch_size=1, c_cond=12, c_hidden=[10, 20], nhead=[2, 5],
                 blocks=[2, 1], level_config=["CTA", "CT"], inject_effnet=[True, False],
                 effnet_embd=6, clip_embd=12, kernel_size=5, dropout=0.0),
            3, 8, 6, (9, 4), 5,
        ),
    ]
    for name, cfg, b, H, W, (eh, ew), L in cases:
        model = redraw_(WuerstchenDiffNeXt(**cfg), gen, damp=("clf.1",))
        x = torch.randn(b, cfg["c_in"], H, W, generator=gen)
        r = torch.tensor([1.0, 0.25, 0.0][:b])
        effnet = torch.randn(b, cfg["effnet_embd"], eh, ew, generator=gen)
        clip = torch.randn(b, L, cfg["clip_embd"], generator=gen)
        with torch.no_grad():
            y = model(x, r, effnet, clip)
        save_case(name, "decoder", model, dict(x=x, r=r, effnet=effnet, clip=clip), y)


# ---------------------------------------------------------------- Stage A VQGAN
def vqgan_cases(gen):
    cases = [
        ("vqgan_a", dict(in_channels=3, out_channels=3, up_down_scale_factor=2, levels=2, bottleneck_blocks=2,
                         embed_dim=16, latent_channels=4, num_vq_embeddings=64, scale_factor=0.3764), 2, 16, 24),
        ("vqgan_b", dict(in_channels=3, out_channels=3, up_down_scale_factor=2, levels=3, bottleneck_blocks=1,
                         embed_dim=24, latent_channels=4, num_vq_embeddings=32, scale_factor=0.5), 1, 24, 16),
    ]
    for name, cfg, b, Hi, Wi in cases:
        model = redraw_(PaellaVQModel(**cfg), gen, damp=("out_block.0",))
        images = torch.rand(b, 3, Hi, Wi, generator=gen)
        with torch.no_grad():
            latents = model.encode(images).latents
        save_case(name + "_encode", "vqgan-encode", model, dict(images=images), latents)
        lat = torch.randn(b, cfg["latent_channels"], latents.shape[2], latents.shape[3], generator=gen)
        with torch.no_grad():
            dec = model.decode(lat, force_not_quantize=True).sample
            zq, _, (_, _, idx) = model.vquantizer(lat)
        save_case(name + "_decode", "vqgan-decode", model, dict(latents=lat), dec)
        # codebook lookup: indices and quantized latents for the library test
        save_file({"latents": lat, "quantized": zq.contiguous(), "indices": idx.reshape(-1).long()},
                  OUT / (name + "_decode") / "quantize.safetensors")


# ---------------------------------------------------------------- CLIP text encoders
def text_encoder_cases(gen, tok):
    prompts = ["a photograph of an astronaut riding a horse", "", "Anthropomorphic dog, 4k!!"]
    enc = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    cases = [
        # vocabulary of real CLIP (so the pipeline can use it), stored in f16 with the
        # hub's `text_model.` prefix
        ("text_encoder_a", dict(vocab_size=49408, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                                num_attention_heads=2, hidden_act="gelu"), "f16-prefixed"),
        # small vocabulary, ids and padding masks drawn at random
        ("text_encoder_b", dict(vocab_size=1000, hidden_size=12, intermediate_size=20, num_hidden_layers=3,
                                num_attention_heads=3, hidden_act="quick_gelu", layer_norm_eps=1e-6), "f16"),
    ]
    for name, cfg, layout in cases:
        model = redraw_(CLIPTextModel(CLIPTextConfig(**cfg)), gen)
        with torch.no_grad():
            # as the pipeline would see weights stored in f16
            for p in model.parameters():
                p.copy_(p.half().float())
        inputs = dict(input_ids=enc.input_ids.long(), attention_mask=enc.attention_mask.long())
        if cfg["vocab_size"] < 49408:
            ids = torch.randint(0, cfg["vocab_size"], (2, 77), generator=gen)
            mask = torch.zeros(2, 77, dtype=torch.long)
            mask[0, :5] = 1
            mask[1, :77] = 1
            inputs = dict(input_ids=ids, attention_mask=mask)
        with torch.no_grad():
            y = model(**inputs).last_hidden_state
        save_case(name, "text-encoder", model, inputs, y, prompts=prompts)
        folder = OUT / name / "model"
        sd = {k: v.half().contiguous() for k, v in model.state_dict().items()}
        if layout == "f16-prefixed":
            sd = {"text_model." + k: v for k, v in sd.items()}
        os.remove(folder / "model.safetensors")
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


# ---------------------------------------------------------------- tokenizer
def clip_vocab_and_merges():
    """vocab.json / merges.txt derived from the real CLIP BPE file, as the hub's."""
    import importlib.util

    # locate the package without importing it (its import needs torchvision)
    spec = importlib.util.find_spec("open_clip")
    bpe_path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_chars = [chr(c) for c in cs]
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    return {t: i for i, t in enumerate(vocab)}, merges


PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    "Anthropomorphic cat dressed as a pilot, 4K, trending on ArtStation!!!",
    "A RED circle on a blue background",
    "numbers: 1234567890 3.14159 1,000,000 and 42nd",
    "punctuation... ?!? (brackets) [square] {curly} <angle> 'quotes' \"double\" -- dashes; semi:colon",
    "don't won't it's we're they've I'm you'll he'd",
    "café naïve résumé über Ångström façade",
    "東京の夜景、ネオンサイン",
    "一只戴着帽子的猫",
    "한국어 텍스트 프롬프트",
    "emoji 🐶🍕🚀 and ❤️ hearts 👩‍🚀",
    "repeated   spaces\tand\ttabs\nand\nnewlines    everywhere",
    "   leading and trailing spaces   ",
    "UPPER lower MiXeD CaSe",
    "snake_case and kebab-case and CamelCase and dotted.names",
    "url https://example.com/path?query=1&x=2 email someone@example.org",
    "hashtags #art #digitalart @mentions $100 50% off & more ~tilde `backtick` ^caret |pipe|",
    "Ελληνικά και русский текст и العربية",
    " ".join(["a very long prompt that keeps going"] * 20),
    "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopic",
    "a dog, a cat , a bird ,a fish",
    "\u00a0non-breaking\u2009thin\u3000ideographic spaces",
    "ﬁ ligature and full-width ＡＢＣ１２３",
]


def tokenizer_fixture():
    folder = OUT / "tokenizer"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    # as the hub's tokenizer_config.json: the pipelines truncate to model_max_length
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"}, indent=2) + "\n")
    tok = CLIPTokenizer.from_pretrained(str(folder))
    assert len(tok) == 49408 and tok.model_max_length == 77, (len(tok), tok.model_max_length)
    json_dir = folder / "json"
    tok.save_pretrained(str(json_dir))
    for extra in ("vocab.json", "merges.txt"):
        (json_dir / extra).unlink(missing_ok=True)
    tok_json = CLIPTokenizer.from_pretrained(str(json_dir))
    # tokenizer.json repeats vocab and merges (3.6 MB): committed gzipped
    raw = (json_dir / "tokenizer.json").read_bytes()
    (json_dir / "tokenizer.json.gz").write_bytes(gzip.compress(raw, mtime=0))
    (json_dir / "tokenizer.json").unlink()
    enc = tok(PROMPTS, padding="max_length", max_length=77, truncation=True)
    enc_json = tok_json(PROMPTS, padding="max_length", max_length=77, truncation=True)
    assert enc["input_ids"] == enc_json["input_ids"]
    cases = [
        {"prompt": p, "input_ids": ids, "attention_mask": m}
        for p, ids, m in zip(PROMPTS, enc["input_ids"], enc["attention_mask"])
    ]
    (folder / "expected.json").write_text(json.dumps(cases, ensure_ascii=False, indent=1) + "\n")
    write_header(folder, component="tokenizer", tokenizer_class=type(tok).__name__)
    print(f"tokenizer: {len(PROMPTS)} prompts, vocab {len(vocab)}")
    return tok


# ---------------------------------------------------------------- scheduler
def scheduler_fixture(gen):
    from diffusers.pipelines.deprecated.wuerstchen.pipeline_wuerstchen_prior import DEFAULT_STAGE_C_TIMESTEPS

    folder = OUT / "scheduler"
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for label, scaler in (("s1", 1.0), ("s2", 2.0), ("s05", 0.5)):
        sched = DDPMWuerstchenScheduler(scaler=scaler)
        t = torch.linspace(0.0, 1.0, 101)
        tensors[f"{label}.t"] = t
        tensors[f"{label}.alpha_cumprod"] = sched._alpha_cumprod(t, "cpu")
    # step along both schedules with recorded noise
    for label, kwargs in (("default", dict(timesteps=DEFAULT_STAGE_C_TIMESTEPS)), ("linear", dict(num_inference_steps=7))):
        sched = DDPMWuerstchenScheduler()
        sched.set_timesteps(**kwargs)
        tensors[f"{label}.timesteps"] = sched.timesteps.float()
        x = torch.randn(2, 3, 4, 5, generator=gen)
        tensors[f"{label}.x0"] = x.clone()
        for i, t in enumerate(sched.timesteps[:-1]):
            eps = torch.randn(x.shape, generator=gen)
            # diffusers draws the step noise itself (randn_tensor): record what it draws
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1000 + i))
            g = torch.Generator().manual_seed(1000 + i)
            x = sched.step(eps, t.expand(2), x, generator=g).prev_sample
            tensors[f"{label}.eps.{i}"] = eps
            tensors[f"{label}.noise.{i}"] = noise
            tensors[f"{label}.x.{i + 1}"] = x.clone()
    sched = DDPMWuerstchenScheduler()
    x0 = torch.randn(3, 2, 4, 4, generator=gen)
    n = torch.randn(3, 2, 4, 4, generator=gen)
    t = torch.tensor([0.05, 0.5, 0.97])
    tensors.update({"add_noise.x0": x0, "add_noise.noise": n, "add_noise.t": t,
                    "add_noise.out": sched.add_noise(x0, n, t)})
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "scheduler.safetensors")
    write_header(folder, component="scheduler")
    print(f"scheduler: {len(tensors)} tensors")


# ---------------------------------------------------------------- resize
def resize_fixture(gen):
    folder = OUT / "resize"
    folder.mkdir(parents=True, exist_ok=True)
    x = torch.randn(2, 3, 24, 24, generator=gen)
    y = torch.randn(1, 2, 5, 7, generator=gen)
    tensors = {"x": x, "y": y}
    for (src, name) in ((x, "x"), (y, "y")):
        # No output width of 1: torch 2.15 then returns the first output row for every
        # row (a degenerate case no Würstchen level reaches; we interpolate properly).
        for h, w in ((64, 64), (32, 32), (16, 16), (8, 12), (3, 5), (24, 24), (1, 7), (13, 2), (48, 20)):
            tensors[f"{name}.{h}x{w}"] = torch.nn.functional.interpolate(
                src, size=(h, w), mode="bicubic", antialias=True, align_corners=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "resize.safetensors")
    write_header(folder, component="resize")


# ---------------------------------------------------------------- full-size layouts
# The official architectures (REFERENCE.md), by component; scripts/full_size_parity.py
# builds them too.
FULL_SIZE_CONFIGS = {
    "prior": dict(c_in=16, c=1536, c_cond=1280, c_r=64, depth=32, nhead=24, dropout=0.1),
    "decoder": dict(c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=1024, c_hidden=[320, 640, 1280, 1280],
                    nhead=[-1, 10, 20, 20], blocks=[4, 4, 14, 4], level_config=["CT", "CTA", "CTA", "CTA"],
                    inject_effnet=[False, True, True, True], effnet_embd=16, clip_embd=1024, kernel_size=3,
                    dropout=0.1),
    "vqgan": dict(in_channels=3, out_channels=3, up_down_scale_factor=2, levels=2, bottleneck_blocks=12,
                  embed_dim=384, latent_channels=4, num_vq_embeddings=8192, scale_factor=0.3764),
    "prior_text_encoder": dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                               num_attention_heads=20, hidden_act="gelu"),
    "decoder_text_encoder": dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                                 num_hidden_layers=24, num_attention_heads=16, hidden_act="gelu"),
}


def build_full_size(name: str):
    cfg = FULL_SIZE_CONFIGS[name]
    if name == "prior":
        return WuerstchenPrior(**cfg)
    if name == "decoder":
        return WuerstchenDiffNeXt(**cfg)
    if name == "vqgan":
        return PaellaVQModel(**cfg)
    return CLIPTextModel(CLIPTextConfig(**cfg))


def full_size_layouts():
    folder = OUT / "full_size"
    folder.mkdir(parents=True, exist_ok=True)
    for name in FULL_SIZE_CONFIGS:
        with torch.device("meta"):
            model = build_full_size(name)
        params = {k for k, _ in model.named_parameters()}
        layout = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "tensors": {k: {"shape": list(v.shape), "parameter": k in params} for k, v in model.state_dict().items()},
        }
        (folder / f"{name}.json").write_text(json.dumps(layout, indent=0) + "\n")
        print(f"full size {name}: {len(layout['tensors'])} tensors, {layout['parameters']:,} parameters")
    write_header(folder, component="full-size state-dict layouts")


# ---------------------------------------------------------------- whole pipelines
PIPELINE_CASES = [
    # guidance on both stages with a negative prompt, default 29-call prior schedule,
    # non-square
    dict(name="cfg_both_stages", prompt="a red circle on a blue background", negative_prompt="blurry, low quality",
         width=256, height=128, num_images=1, prior_steps=None, prior_guidance=4.0, decoder_steps=3,
         decoder_guidance=2.0),
    # two images per prompt, linear prior schedule, no decoder guidance
    dict(name="two_images_linear", prompt="Anthropomorphic dog wearing a hat, 4k", negative_prompt="",
         width=128, height=256, num_images=2, prior_steps=4, prior_guidance=4.0, decoder_steps=2,
         decoder_guidance=0.0),
    # a prompt over 77 tokens, no guidance anywhere (negative prompt unused)
    dict(name="long_prompt_no_guidance", prompt=" ".join(["a very long prompt that keeps going"] * 20),
         negative_prompt="ignored", width=128, height=128, num_images=1, prior_steps=3, prior_guidance=1.0,
         decoder_steps=2, decoder_guidance=1.0),
]


def pipeline_fixtures(gen):
    """Two tiny diffusers pipeline folders and full runs on them with the noise they
    drew, in the layout `wuerstchen generate --noise` replays."""
    from diffusers.pipelines.deprecated.wuerstchen import pipeline_wuerstchen, pipeline_wuerstchen_prior
    from diffusers.pipelines.deprecated.wuerstchen.pipeline_wuerstchen import WuerstchenDecoderPipeline
    from diffusers.pipelines.deprecated.wuerstchen.pipeline_wuerstchen_prior import (
        DEFAULT_STAGE_C_TIMESTEPS, WuerstchenPriorPipeline)
    from diffusers.schedulers import scheduling_ddpm_wuerstchen
    from diffusers.utils.torch_utils import randn_tensor

    root = OUT / "pipeline"
    if root.exists():
        shutil.rmtree(root)
    tok = CLIPTokenizer.from_pretrained(str(OUT / "tokenizer"))

    def text_encoder(hidden, layers, heads):
        cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=hidden * 3,
                             num_hidden_layers=layers, num_attention_heads=heads, hidden_act="gelu")
        model = redraw_(CLIPTextModel(cfg), gen)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
        return model

    prior = redraw_(WuerstchenPrior(c_in=16, c=32, c_cond=16, c_r=16, depth=2, nhead=4, dropout=0.1), gen,
                    damp=("out.1",))
    prior_te = text_encoder(16, 2, 2)
    decoder = redraw_(WuerstchenDiffNeXt(c_in=4, c_out=4, c_r=12, patch_size=2, c_cond=16, c_hidden=[16, 24, 32],
                                         nhead=[-1, 4, 4], blocks=[1, 1, 1], level_config=["CT", "CTA", "CTA"],
                                         inject_effnet=[False, True, True], effnet_embd=16, clip_embd=8,
                                         kernel_size=3, dropout=0.1), gen, damp=("clf.1",))
    decoder_te = text_encoder(8, 1, 2)
    vqgan = redraw_(PaellaVQModel(levels=2, bottleneck_blocks=1, embed_dim=16, latent_channels=4,
                                  num_vq_embeddings=32), gen, damp=("out_block.0",))
    with torch.no_grad():
        # images around mid-grey with visible structure, not clipped to 0 / 1
        vqgan.out_block[0].bias.fill_(0.5)
        vqgan.out_block[0].weight.mul_(0.5)
    scheduler = DDPMWuerstchenScheduler()
    prior_pipe = WuerstchenPriorPipeline(tokenizer=tok, text_encoder=prior_te, prior=prior, scheduler=scheduler)
    decoder_pipe = WuerstchenDecoderPipeline(tokenizer=tok, text_encoder=decoder_te, decoder=decoder,
                                             scheduler=scheduler, vqgan=vqgan)

    def save_pipeline(folder, pipe, parts):
        folder.mkdir(parents=True)
        for part in parts:
            component = getattr(pipe, part)
            component.save_pretrained(folder / part, safe_serialization=True)
            if part == "text_encoder":
                # stored in f16 with the hub's `text_model.` prefix, as the official repos
                sd = {"text_model." + k: v.half().contiguous() for k, v in component.state_dict().items()}
                save_file(sd, folder / part / "model.safetensors", metadata={"format": "pt"})
        # the tokenizer of the tokenizer fixture (vocab.json + merges.txt), linked
        os.symlink("../../tokenizer", folder / "tokenizer")
        index = {k: v for k, v in dict(pipe.config).items()}
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    save_pipeline(root / "prior", prior_pipe, ["prior", "text_encoder", "scheduler"])
    save_pipeline(root / "decoder", decoder_pipe, ["decoder", "vqgan", "text_encoder", "scheduler"])

    draws = []

    def recording_randn(shape, generator=None, device=None, dtype=None, layout=None):
        t = randn_tensor(shape, generator=generator, device=device, dtype=dtype, layout=layout)
        draws.append(t.clone())
        return t

    for module in (pipeline_wuerstchen, pipeline_wuerstchen_prior, scheduling_ddpm_wuerstchen):
        module.randn_tensor = recording_randn

    for case in PIPELINE_CASES:
        draws.clear()
        generator = torch.Generator().manual_seed(len(case["name"]))
        with torch.no_grad():
            prior_kwargs = (dict(timesteps=DEFAULT_STAGE_C_TIMESTEPS) if case["prior_steps"] is None
                            else dict(num_inference_steps=case["prior_steps"]))
            embeddings = prior_pipe(prompt=case["prompt"], negative_prompt=case["negative_prompt"],
                                    height=case["height"], width=case["width"],
                                    num_images_per_prompt=case["num_images"],
                                    guidance_scale=case["prior_guidance"], generator=generator,
                                    output_type="pt", return_dict=False, **prior_kwargs)[0]
            prior_calls = len(prior_pipe.scheduler.timesteps) - 1
            images = decoder_pipe(image_embeddings=embeddings, prompt=case["prompt"],
                                  negative_prompt=case["negative_prompt"],
                                  num_inference_steps=case["decoder_steps"],
                                  guidance_scale=case["decoder_guidance"], generator=generator,
                                  output_type="np").images
        assert len(draws) == 2 + prior_calls + case["decoder_steps"], len(draws)
        noise = {"prior.init": draws[0]}
        noise.update({f"prior.step.{i}": draws[1 + i] for i in range(prior_calls)})
        noise["decoder.init"] = draws[1 + prior_calls]
        noise.update({f"decoder.step.{i}": draws[2 + prior_calls + i] for i in range(case["decoder_steps"])})
        folder = root / case["name"]
        folder.mkdir(parents=True)
        save_file({k: v.float().contiguous() for k, v in noise.items()}, folder / "noise.safetensors")
        save_file({"image_embeddings": embeddings.contiguous(),
                   "images": torch.from_numpy(images).contiguous()}, folder / "debug.safetensors")
        for i, pil in enumerate(decoder_pipe.numpy_to_pil(images)):
            pil.save(folder / f"expected-{i}.png")
        (folder / "params.json").write_text(json.dumps(case, indent=2) + "\n")
        write_header(folder, component="pipeline", prior_calls=prior_calls)
        arr = (images * 255).round()
        print(f"pipeline {case['name']}: {images.shape}, {prior_calls} prior calls, "
              f"8-bit mean {arr.mean():.1f}, saturated {((arr == 0) | (arr == 255)).mean():.1%}")


def jpeg_fixture():
    """A small JPEG training sample (4:2:0, as cameras write them) with its caption, and
    libjpeg's decoding of it (through Pillow) as a PNG: our decoder must agree."""
    from PIL import Image, ImageDraw
    import numpy as np

    folder = OUT / "jpeg"
    folder.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (32, 32), (30, 60, 220))
    ImageDraw.Draw(img).ellipse((6, 6, 25, 25), fill=(220, 40, 40))
    (folder / "data").mkdir(exist_ok=True)
    img.save(folder / "data" / "00000.jpg", quality=90, subsampling=2)
    (folder / "data" / "00000.txt").write_text("a red circle on a blue background\n")
    decoded = Image.open(folder / "data" / "00000.jpg").convert("RGB")
    decoded.save(folder / "libjpeg_decoded.png")
    write_header(folder, component="jpeg", pillow=Image.__version__)
    print(f"jpeg: 32x32, mean {np.asarray(decoded).mean():.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=20240117)
    args = ap.parse_args()
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(args.seed)
    OUT.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_fixture()
    scheduler_fixture(gen)
    resize_fixture(gen)
    prior_cases(gen)
    decoder_cases(gen)
    vqgan_cases(gen)
    text_encoder_cases(gen, tok)
    full_size_layouts()
    pipeline_fixtures(gen)
    jpeg_fixture()


if __name__ == "__main__":
    sys.exit(main())
