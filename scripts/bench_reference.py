#!/usr/bin/env python3
"""Times diffusers on exactly the shapes `wuerstchen bench` uses, for side-by-side ratios
(scripts/compare_speed.sh runs both).

Official full-size configs with random weights: the prior with guidance (batch 2),
the decoder without (batch 1), the Stage A decode, the two CLIP text encoders, and the
whole default recipe (29 prior calls, 12 decoder calls) through diffusers' own
pipelines. Same flags and the same JSON objects as `wuerstchen bench --json`; GFLOP
from torch's FlopCounterMode, peak RSS from VmHWM (reset before each component).

    python scripts/bench_reference.py --component prior --threads 2 --json

Needs torch, diffusers and transformers (see README: "Regenerating the fixtures").
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

COMPONENTS = ["prior", "decoder", "vqgan-decode", "prior-text-encoder", "decoder-text-encoder", "pipeline"]
HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "..", "tests", "fixtures", "tokenizer")


def peak_rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def latent_sizes(w, h):
    for what, v in (("width", w), ("height", h)):
        if v <= 0 or v % 128:
            sys.exit(f"{what} {v} is not a positive multiple of 128")
    ph, pw = math.ceil(h / 42.67), math.ceil(w / 42.67)
    return (ph, pw), (int(ph * 10.67), int(pw * 10.67))


def wuerstchen():
    # diffusers moved the Würstchen pipelines under `deprecated` in 0.36
    try:
        import diffusers.pipelines.deprecated.wuerstchen as w
    except ImportError:
        import diffusers.pipelines.wuerstchen as w
    return w


def modules():
    w = wuerstchen()
    return w.PaellaVQModel, w.WuerstchenDiffNeXt, w.WuerstchenPrior


def clip(kind):
    from transformers import CLIPTextConfig, CLIPTextModel
    if kind == "prior":  # CLIP ViT-bigG/14
        cfg = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                             num_attention_heads=20, hidden_act="gelu", projection_dim=1280)
    else:  # CLIP ViT-H/14
        cfg = CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                             num_attention_heads=16, hidden_act="gelu", projection_dim=1024)
    return CLIPTextModel(cfg).eval()


def prior_model():
    return modules()[2](c_in=16, c=1536, c_cond=1280, c_r=64, depth=32, nhead=24, dropout=0.0).eval()


def decoder_model():
    return modules()[1](dropout=0.0).eval()  # the class defaults are the official decoder


def vqgan_model():
    return modules()[0]().eval()


def prompt_ids(batch):
    ids = torch.full((batch, 77), 49407, dtype=torch.long)
    ids[:, 0] = 49406
    ids[:, 1:9] = torch.arange(1, 9) * 7 + 320
    mask = (torch.arange(77) < 10).long().expand(batch, 77)
    return ids, mask


def build(component, w, h, dtype, dev):
    (ph, pw), (dh, dw) = latent_sizes(w, h)
    g = torch.Generator().manual_seed(1)
    rand = lambda *s: torch.randn(*s, generator=g).to(dev, dtype)
    if component == "prior":
        m = prior_model().to(dev, dtype)
        # guidance's batch, as the pipeline makes it: one latent under the text and under no text
        x, r, c = rand(1, 16, ph, pw).repeat(2, 1, 1, 1), torch.full((2,), 0.5).to(dev, dtype), rand(2, 77, 1280)
        return 2, lambda: m(x, r, c)
    if component == "decoder":
        m = decoder_model().to(dev, dtype)
        x, r = rand(1, 4, dh, dw), torch.full((1,), 0.5).to(dev, dtype)
        eff, c = rand(1, 16, ph, pw), rand(1, 77, 1024)
        return 1, lambda: m(x, r, eff, c)
    if component == "vqgan-decode":
        m = vqgan_model().to(dev, dtype)
        x = rand(1, 4, dh, dw)
        return 1, lambda: m.decode(x).sample
    if component in ("prior-text-encoder", "decoder-text-encoder"):
        prior = component == "prior-text-encoder"
        m = clip("prior" if prior else "decoder").to(dev)  # the pipelines keep them in f32
        batch = 2 if prior else 1
        ids, mask = (t.to(dev) for t in prompt_ids(batch))
        return batch, lambda: m(ids, attention_mask=mask).last_hidden_state
    if component == "pipeline":
        return 1, pipeline(w, h, dtype, dev)
    sys.exit(f"unknown component `{component}` (one of {', '.join(COMPONENTS)})")


def pipeline(w, h, dtype, dev):
    module = wuerstchen()  # not `w`: that is the width
    DEFAULT_STAGE_C_TIMESTEPS = module.DEFAULT_STAGE_C_TIMESTEPS
    WuerstchenPriorPipeline, WuerstchenDecoderPipeline = module.WuerstchenPriorPipeline, module.WuerstchenDecoderPipeline
    from diffusers import DDPMWuerstchenScheduler
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(TOKENIZER)

    def prior_pipe():
        return WuerstchenPriorPipeline(prior=prior_model().to(dtype), text_encoder=clip("prior"), tokenizer=tok,
                                       scheduler=DDPMWuerstchenScheduler()).to(dev)

    def decoder_pipe():
        return WuerstchenDecoderPipeline(decoder=decoder_model().to(dtype), text_encoder=clip("decoder"),
                                         tokenizer=tok, vqgan=vqgan_model().to(dtype),
                                         scheduler=DDPMWuerstchenScheduler()).to(dev)

    # on a GPU both stay resident, built once, as `wuerstchen bench` keeps them there
    resident = (prior_pipe(), decoder_pipe()) if dev.type == "cuda" else None

    def run():
        # on the CPU one stage built at a time, as `wuerstchen bench` does
        prior = resident[0] if resident else prior_pipe()
        emb = prior(prompt="a photo", height=h, width=w, timesteps=DEFAULT_STAGE_C_TIMESTEPS,
                    guidance_scale=4.0, output_type="pt").image_embeddings
        del prior
        dec = resident[1] if resident else decoder_pipe()
        return dec(image_embeddings=emb.to(dtype), prompt="a photo", num_inference_steps=12, guidance_scale=0.0,
                   output_type="pt").images
    return run


def bench(component, a, dtype):
    reset_peak_rss()
    cuda = a.device.startswith("cuda")
    batch, built_call = build(component, a.width, a.height, dtype, torch.device(a.device))

    def call():  # a GPU call is timed until its kernels finish
        out = built_call()
        if cuda:
            torch.cuda.synchronize()
        return out
    with torch.inference_mode():
        for _ in range(a.warmup):
            call()
        times, gflop = [], 0.0
        for _ in range(a.runs):
            counter = FlopCounterMode(display=False)
            start = time.perf_counter()
            if component == "pipeline":  # the counter's overhead would be timed too
                call()
            else:
                with counter:
                    call()
            secs = time.perf_counter() - start
            gflop = counter.get_total_flops() / 1e9
            print(f"  {secs:.3f} s", file=sys.stderr)
            times.append(secs)
    return dict(component=component, dtype=a.dtype, width=a.width, height=a.height, batch=batch,
                threads=torch.get_num_threads(), median_s=statistics.median(times), min_s=min(times),
                max_s=max(times), gflop=gflop, peak_rss_mib=peak_rss_mib())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--component", action="append", choices=COMPONENTS)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    p.add_argument("--threads", type=int)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    rows = []
    for c in a.component or COMPONENTS[:5]:
        print(f"{c}: building and {a.warmup} warm-up run(s)...", file=sys.stderr)
        rows.append(bench(c, a, dtype))
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['component']:<21} {r['dtype']:>5} {r['width']}x{r['height']:<6} {r['median_s']:9.3f} s "
                  f"{r['gflop']:9.1f} GFLOP {r['gflop'] / r['median_s']:8.1f} GFLOP/s {r['peak_rss_mib']:8.0f} MiB")


if __name__ == "__main__":
    main()
