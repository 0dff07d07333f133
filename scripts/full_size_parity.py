#!/usr/bin/env python3
"""Full-size parity: the official architectures with random weights, one forward pass
each in diffusers / transformers (f32, the reference) and in `wuerstchen forward` (in
the dtype and on the device asked for), compared.

The tests' fixtures are tiny models; this checks the sizes users run (the official
configs, 1024 x 1024 shapes: a 24 x 24 prior latent in a guidance batch, the decoder's
256 x 256 latent, Stage A's decode to 1024 px, both CLIP text encoders), where
blocking, tiling and threading take paths tiny shapes do not. Too large to commit
(8.5 GB of weights in all), so it runs by hand and prints its table:

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install -r scripts/requirements.txt
    cargo build --release
    /tmp/ref/bin/python scripts/full_size_parity.py [--size 1024] [--dtype f32|bf16|f16]
        [--device cpu|cuda] [--work DIR] [COMPONENT...]

COMPONENT: prior, decoder, vqgan-decode, prior-text-encoder, decoder-text-encoder
(default: all). WUERSTCHEN names the binary (default target/release/wuerstchen).
Exits 1 when an output is further from diffusers' f32 than 1e-4 * max(1, max|y|) (the
fixtures' tolerance; f16: 5e-4, the f16 parity test's), or in bf16 further than
diffusers' own bf16 output is.
"""

import argparse
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import build_full_size, redraw_  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def inputs_for(component: str, size: int, gen: torch.Generator) -> dict:
    """The default recipe's shapes at `size` px (diffusers' latent arithmetic)."""
    prior_side = math.ceil(size / 42.67)
    decoder_side = int(prior_side * 10.67)
    if component == "prior":
        # classifier-free guidance's batch: one latent twice, under two texts
        x = torch.randn(1, 16, prior_side, prior_side, generator=gen).repeat(2, 1, 1, 1)
        return dict(x=x, r=torch.tensor([0.7, 0.7]), c=torch.randn(2, 77, 1280, generator=gen))
    if component == "decoder":
        return dict(
            x=torch.randn(1, 4, decoder_side, decoder_side, generator=gen),
            r=torch.tensor([0.6]),
            effnet=torch.randn(1, 16, prior_side, prior_side, generator=gen),
            clip=torch.randn(1, 77, 1024, generator=gen),
        )
    if component == "vqgan-decode":
        return dict(latents=torch.randn(1, 4, size // 4, size // 4, generator=gen))
    # text encoders: a padded prompt and a full one, ids below the vocabulary's
    # special tokens with the end-of-text id where the prompt ends
    ids = torch.randint(0, 49406, (2, 77), generator=gen)
    mask = torch.ones(2, 77, dtype=torch.long)
    ids[0, 0], ids[0, 9], ids[0, 10:] = 49406, 49407, 49407
    mask[0, 10:] = 0
    return dict(input_ids=ids, attention_mask=mask)


def reference(component: str, model, inputs: dict, device: str) -> torch.Tensor:
    model = model.to(device)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    with torch.no_grad():
        if component == "prior":
            return model(inputs["x"], inputs["r"], inputs["c"])
        if component == "decoder":
            return model(inputs["x"], inputs["r"], inputs["effnet"], inputs["clip"])
        if component == "vqgan-decode":
            return model.decode(inputs["latents"], force_not_quantize=True).sample
        return model(**inputs).last_hidden_state


def distance(got: torch.Tensor, expected: torch.Tensor):
    """(max |got - expected|, rms of it)."""
    diff = (got.float() - expected).abs()
    return diff.max().item(), diff.pow(2).mean().sqrt().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = ["prior", "decoder", "vqgan-decode", "prior-text-encoder", "decoder-text-encoder"]
    # checked below: argparse tests an empty list against `choices` too
    ap.add_argument("components", nargs="*", metavar="COMPONENT", help=f"{', '.join(names)} (default: all)")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    ap.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="f32",
                    help="ours in this dtype (the f32 weights rounded as `generate --dtype` rounds them) "
                         "against diffusers' f32; for bf16 diffusers' own bf16 run beside it")
    ap.add_argument("--device", default="cpu",
                    help="cpu | cuda | cuda:N: both sides run there (diffusers without TF32)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/wuerstchen-full-size"))
    ap.add_argument("--seed", type=int, default=20261207)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    if unknown := [c for c in args.components if c not in names]:
        ap.error(f"unknown component {unknown[0]!r}: choose from {', '.join(names)}")
    binary = os.environ.get("WUERSTCHEN", str(ROOT / "target/release/wuerstchen"))
    torch.set_num_threads(args.threads)
    # the f32 reference in f32: no TF32 in PyTorch's CUDA matmuls and convolutions
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    failed = False
    print(f"ours in {args.dtype} against diffusers' f32" + (", and diffusers' bf16 against its f32"
                                                            if args.dtype == "bf16" else ""))
    print(f"{'component':<21} {'output':<20} {'max|y|':>9} {'max|diff|':>10} {'rms diff':>10} "
          f"{'tolerance':>10} {'theirs max':>11} {'theirs rms':>11}")
    for component in args.components or names:
        gen = torch.Generator().manual_seed(args.seed)
        built = {"vqgan-decode": "vqgan"}.get(component, component.replace("-", "_"))
        # the output heads kept small, as the fixtures do, so the outputs stay well
        # conditioned after dozens of random blocks
        damp = {"prior": ("out.1",), "decoder": ("clf.1",), "vqgan": ("out_block.0",)}.get(built, ())
        model = redraw_(build_full_size(built), gen, damp=damp)
        inputs = inputs_for(component, args.size, gen)
        expected = reference(component, model, inputs, args.device).float().cpu()
        folder = args.work / component
        shutil.rmtree(folder, ignore_errors=True)
        model.save_pretrained(folder / "model", safe_serialization=True)
        theirs = None
        if args.dtype == "bf16":
            # PyTorch's bf16 on this CPU (oneDNN): the yardstick for ours
            half = {k: v.bfloat16() if v.is_floating_point() else v for k, v in inputs.items()}
            theirs = distance(reference(component, model.bfloat16(), half, args.device).cpu(), expected)
        del model
        save_file({k: v.contiguous() for k, v in inputs.items()}, folder / "inputs.safetensors")
        cli_component = "text-encoder" if component.endswith("text-encoder") else component
        subprocess.run([binary, "forward", cli_component, "--model", folder / "model", "--inputs",
                        folder / "inputs.safetensors", "--output", folder / "output.safetensors",
                        "--dtype", args.dtype, "--device", args.device], check=True)
        got_max, got_rms = distance(load_file(folder / "output.safetensors")["output"], expected)
        scale = max(1.0, expected.abs().max().item())
        # f32: the fixtures' tolerance; f16: the f16 parity test's; bf16: no further
        # from f32 than PyTorch's own bf16
        if theirs:
            ok = got_max <= theirs[0] and got_rms <= theirs[1]
            tolerance = "theirs"
        else:
            limit = {"f32": 1e-4, "f16": 5e-4}[args.dtype] * scale
            ok = got_max <= limit and got_rms <= limit
            tolerance = f"{limit:10.1e}"
        failed |= not ok
        cells = f"{theirs[0]:11.2e} {theirs[1]:11.2e}" if theirs else f"{'-':>11} {'-':>11}"
        print(f"{component:<21} {str(tuple(expected.shape)):<20} {expected.abs().max().item():9.3f} "
              f"{got_max:10.2e} {got_rms:10.2e} {tolerance:>10} {cells}"
              f"{'' if ok else '  FAILED'}", flush=True)
        shutil.rmtree(folder)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
