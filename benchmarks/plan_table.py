r"""The plan table of README's "Planning a TPU run": `mae_jax.plan` for the paper's recipes on TPU slices.

  python benchmarks/plan_table.py --out /tmp/plans            # every case (hours of compiling on 2 cores)
  python benchmarks/plan_table.py --out /tmp/plans --cases vit_base_v3_f32,vit_base_v5e_scan

Each case runs `python -m mae_jax.plan --dump OUT/<case>` in its own process (compile times are measured cold,
and one case's compiler memory does not carry into the next); a case already planned (OUT/<case>/plan.json) is
not planned again. Prints a JSON line per case and, at the end, the markdown table README shows.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_HOURS = {("vit_large", "v3:8x8"): 15.4, ("vit_huge", "v3:8x8"): 34.5}  # 800 epochs, 128 TPU-v3 cores

# name: (config, topology, overrides)
CASES = {}
for size in ("base", "large", "huge"):
    for dtype in ("float32", "bfloat16"):
        CASES[f"vit_{size}_v3_{dtype[:4]}"] = (f"configs/vit_{size}.py", "v3:8x8", [f"--config.model.dtype={dtype}"])
    for slice_ in ("v5e:8x8", "v5p:4x4x4", "v6e:8x8"):
        CASES[f"vit_{size}_{slice_.split(':')[0]}"] = (f"configs/vit_{size}.py", slice_,
                                                       ["--config.model.dtype=bfloat16"])
    CASES[f"finetune_{size}_v3"] = (f"configs/finetune_vit_{size}.py", "v3:8x8", [])
CASES["vit_base_v5e16"] = ("configs/vit_base.py", "v5e:4x4", ["--config.model.dtype=bfloat16"])
CASES["vit_base_v5e16_scan"] = ("configs/vit_base.py", "v5e:4x4", ["--config.model.dtype=bfloat16",
                                                                  "--config.model.scan_blocks=True"])


def run_case(name: str, out: str) -> dict:
    config, topology, overrides = CASES[name]
    directory = os.path.join(out, name)
    path = os.path.join(directory, "plan.json")
    if not os.path.exists(path):
        start = time.time()
        result = subprocess.run([sys.executable, "-m", "mae_jax.plan", "--config", config, "--topology", topology,
                                 f"--dump={directory}", *overrides], check=False, cwd=ROOT,
                                 capture_output=True, text=True)
        with open(os.path.join(out, f"{name}.log"), "w") as f:
            f.write(result.stdout + result.stderr)
        if not os.path.exists(path):
            return {"case": name, "failed": (result.stderr or result.stdout)[-2000:]}
        with open(path) as f:
            saved = json.load(f)
        saved["wall_seconds_of_planning"] = time.time() - start
        saved["stderr_last_line"] = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        with open(path, "w") as f:
            json.dump(saved, f, indent=1)
    with open(path) as f:
        return {"case": name, "config": config, "overrides": overrides, **json.load(f)}


def _row(r: dict) -> str:
    step = r["programs"].get("train_step", {})
    memory = step.get("memory", {})
    total = memory.get("total", 0) / 2**30
    hbm = step.get("hbm_bytes", 0) / 2**30
    config = os.path.basename(r["config"]).removesuffix(".py")
    config += "".join(f", {o.removeprefix('--config.model.')}" for o in r["overrides"]
                      if not o.startswith("--config.model.dtype="))
    fits = "yes" if r["fits"] else f"**no**: {step['error']}" if step.get("error") else "**no**"
    suggestion = ""
    if r.get("suggestions"):
        s = r["suggestions"][0]
        change = " ".join(f"{k}={v}" for k, v in s["change"].items())
        suggestion = f"{change}: {s['total_bytes'] / 2**30:.1f} GiB, {s['seconds']:.3f} s"
    cost = step.get("cost_model_seconds")
    paper = PAPER_HOURS.get((config, r["topology"])) if r["dtype"] == "float32" else None
    hours = f"{r['wall_hours']:.1f}" if r.get("wall_hours") else "-"
    cost = "-" if cost is None else f"{cost:.0f} (negative)" if cost < 0 else f"{cost:.3f}"
    compiled = bool(step.get("flops"))
    total = f"{total:.1f}" if compiled else "-"
    flops = f"{step['flops'] / 1e12:.2f}" if compiled else "-"
    roofline = f"{step['roofline_seconds']:.3f}" if compiled else "-"
    images = f"{r['images_per_sec']:,.0f}" if r["images_per_sec"] else "-"
    return (f"| {config} | {r['dtype']} | {r['topology']} ({r['num_chips']} chips) | {r['batch_size']} | "
            f"{step.get('compile_seconds', 0):.0f} | {total} / {hbm:.1f} | {fits} | {flops} | {cost} | "
            f"{roofline} | {images} | {hours}"
            f"{f' (paper {paper})' if paper else ''} | {suggestion} |")


HEADER = ("| config | dtype | slice | batch | compile (s) | GiB per device / HBM | fits | TFLOP per device | "
          "cost model (s) | roofline (s) | images/s | hours |  fits with |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name in args.cases.split(","):
        result = run_case(name, args.out)
        print(json.dumps({k: v for k, v in result.items() if k != "programs"}), flush=True)
        if "failed" not in result:
            rows.append(_row(result))
    print(HEADER)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
