"""Attribution: the official step with our small-map GEMM convolutions swapped in, vs plain official and lean.
One process per arm (peak RSS), interleaved: baseline_gemm, baseline, lean; 2 timed steps each after a warm-up."""
import json, os, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, "/work/main/benchmarks")
import sd15_step as s
out = Path("/work/runs/s11/attrib"); out.mkdir(exist_ok=True)
m = Path("/work/runs/sd15m")
ov = s.sd15_overrides(m / "sd15.safetensors", m / "vit_l14", 16, 25, 5, 1)
if len(sys.argv) > 1 and sys.argv[1] == "child":
    from baseline_official import official_trainer
    from textcraftor_fast.gemm_conv import swap_small_map_convs
    tr = official_trainer(None, [*ov, f'output.dir="{out}/bg"'])
    n = swap_small_map_convs(tr.unet, 64) + swap_small_map_convs(tr.vae, 64)
    s._warm_up(tr)
    times = []
    for _ in range(2):
        t0 = time.perf_counter(); tr.train_step(); times.append(time.perf_counter() - t0)
    import resource
    print(json.dumps({"arm": "baseline_gemm", "swapped": n, "step_s": times,
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}), flush=True)
    raise SystemExit
res = []
for arm in ("baseline_gemm", "baseline", "lean"):
    if arm == "baseline_gemm":
        env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH="/work/main")
        r = subprocess.run([sys.executable, __file__, "child"], env=env, capture_output=True, text=True)
        r = json.loads([l for l in r.stdout.splitlines() if l.startswith("{")][-1])
    else:
        r = s._spawn(arm, ov, 2, out, 2)
    res.append({"arm": arm, "step_s": r["step_s"], "peak_rss_gib": r["peak_rss_gib"], "swapped": r.get("swapped")})
    print(json.dumps(res[-1]), flush=True)
json.dump(res, open(out / "attrib.json", "w"), indent=1)
