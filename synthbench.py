"""
SynthSAEBench (Chanin & Garriga-Alonso 2026, arXiv 2602.14687): SAEs scored against features that are known. A
synthetic "model" draws activations from 16,384 unit directions in 768 dimensions (Zipf firing, a hierarchy of
mutually exclusive children, low-rank correlations, noisy magnitudes, a bias); an SAE trained on them is scored by
explained variance (EV), MCC (the mean |cos| of a one-to-one matching of decoder rows to the true directions) and
F1 of feature detection (each feature's firing against the true feature its decoder row is closest to).

The benchmark and its scorer are SAELens's code (`sae_lens.synthetic`, sae-lens 6.54.12), run by SAELens's own
interpreter ($SAELENS_PYTHON, a venv of its own: SAELens is not a dependency of this project); the training is
sae.py's, on the samples written to a .npy file; the SAE crosses over as analyze.py's SAELens export. This file runs
on both sides: its build, samples, score and saelens modes import sae_lens and nothing of ours; the run mode (ours)
drives the others as subprocesses.

$ SAELENS_PYTHON=saelens-venv/bin/python python synthbench.py --archs=topk,batchtopk --samples=500000 --epochs=4 \
      --curve=250000,500000,1000000 --trainers=gpt_sae,saelens    # scored at 250k, 500k, 1M and 2M samples seen
$ python synthbench.py --mode=plot                                 # figures/synthsaebench/curves.png
$ python synthbench.py --mode=predict                              # each curve extrapolated to 20M samples seen
$ $SAELENS_PYTHON synthbench.py --mode=score --sae_dir=DIR        # any SAELens SAE (cfg.json + safetensors)

The published model (Hugging Face `decoderesearch/synth-sae-bench-16k-v2`) is out of reach offline, so the model is
built here from its published config (config/synthsaebench_16k.json, v2: `scale_children_by_parent` true, the one
the paper's numbers use): SAELens's code and seed 42 give the same directions on any CPU, but not the GPU-built
copy on the Hub, so our numbers are on a sibling of the published model drawn from the same distribution.

The last section is a smaller benchmark of our own, without SAELens: known directions. Activations are sums of a few
of a known set of random unit directions (synthetic_activations, also the tests' `synthetic` fixture); every
architecture is trained over its sparsity sweep by one sae.py process, then at its best setting with the JL penalty
added, and each SAE is scored by how well its decoder rows recover the directions (score_recovery). bench.py runs it:

$ python bench.py --synthetic=True --regime=2 --synthetic_archs=relu,topk --jl_form=power   # about 9 min on 2 cores
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH_CONFIG = os.path.join(HERE, "config", "synthsaebench_16k.json")
ME = os.path.join(HERE, "synthbench.py")  # the run mode calls this file's other modes in SAELens's interpreter
CHUNK = 5_000          # samples generated and written at a time: a (5000, 16384) dense feature batch is 330 MB
TRAIN_SEED = 0         # chunk i of the training samples is drawn after torch.manual_seed(TRAIN_SEED + i) ...
EVAL_SEED = 10 ** 9    # ... and the held-out evaluation after this one: the two streams never share a seed

# sae.py's settings at the benchmark's shape (width 4096, L0 25): a recipe's, then the architecture's. The published
# runs use lr 3e-4 at 200M samples; few samples want more (measured: docs/results.md "Known features")
BATCH, N_VAL = 1024, 8192  # sae.py holds the first N_VAL rows of the samples out for its own evaluation
SHAPE = [f"--eval_tokens={N_VAL}", "--log_interval=100"]
RECIPES = {
    "base": ["--lr=1e-3"],  # sae.py's defaults at lr 1e-3: the rows named base in docs/results.md
    "few_samples": [os.path.join("config", "synthsaebench_few_samples.py")],  # data init, lr 3e-3, k annealed
}
ARCHS = {  # with --d_sae (4096) and --k (25) from the command line
    "topk": ["--arch=topk"],
    "batchtopk": ["--arch=batchtopk"],
    "matryoshka": ["--arch=matryoshka"],  # prefixes d_sae x (1, 4, 16, 32) / 32, the published groups
    # the sparsity coefficients nearest L0 25 at 491k samples from data (relu: L1 3 -> L0 24.1; jumprelu: L0 10 ->
    # 22.9, 3 -> 30.6, 1 -> 36.1); jumprelu's thresholds move slowly in 480 steps, so their start sets the L0 as much
    # as the coefficient: 1.5 (from random directions 2.5 left L0 10 with 55% dead, 0.1 left L0 87-170)
    "relu": ["--arch=relu", "--l1_coeff=3"],
    "jumprelu": ["--arch=jumprelu", "--l0_coeff=10", "--jumprelu_init_threshold=1.5"],
}
MATRYOSHKA_FRACTIONS = (1 / 32, 1 / 8, 1 / 2, 1)  # 128, 512, 2048, 4096 of 4096
# SAELens's trainers at the same budget (its defaults otherwise: the published runs' settings, lr 3e-4 constant)
SAELENS_ARCHS = {"topk": "TopK", "batchtopk": "BatchTopK", "matryoshka": "MatryoshkaBatchTopK"}


# -----------------------------------------------------------------------------------------------------------------
# SAELens's side: run by $SAELENS_PYTHON (imports sae_lens, nothing of ours)

def write_json(path, obj):
    """Into path.tmp, then renamed: a crash leaves the previous file whole (sae.py's write_json, which SAELens's
    interpreter does not import: it runs this side with sae_lens and nothing of ours)."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def load_bench(model_dir):
    """The benchmark model saved by build_bench (never orthogonalised again on load)."""
    from sae_lens.synthetic import SyntheticModel
    return SyntheticModel.load_from_disk(model_dir, device="cpu")


def build_bench(model_dir, config_path=BENCH_CONFIG, orthogonalization_steps=None):
    """Builds the benchmark from its published config (the orthogonalisation of 16,384 directions, 100 Adam steps over
    their Gram matrix, takes about 40 minutes on 2 cores, once) and saves it, written aside and renamed: a model
    directory is whole or absent."""
    from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig
    config = json.load(open(config_path))
    if orthogonalization_steps is not None:  # a smaller, quicker model (the tests'); not the benchmark
        config["orthogonalization"]["num_steps"] = orthogonalization_steps
    model = SyntheticModel(SyntheticModelConfig.from_dict(config), device="cpu")
    shutil.rmtree(model_dir + ".tmp", ignore_errors=True)
    model.save(model_dir + ".tmp")
    os.replace(model_dir + ".tmp", model_dir)
    return model


def write_samples(model_dir, path, n):
    """n training samples (n, hidden_dim) fp32 in path, drawn CHUNK at a time, chunk i after seed TRAIN_SEED + i: the
    file is the same however often the writing stopped. Written into path.tmp (a memory map) with the count done in
    path.tmp.json after each chunk; an interrupted call continues from there; renamed to path when complete."""
    import torch
    model = load_bench(model_dir)
    d = model.cfg.hidden_dim
    tmp, progress = path + ".tmp", path + ".tmp.json"
    state = json.load(open(progress)) if os.path.exists(progress) and os.path.exists(tmp) else {}
    done = state["rows"] if state.get("n") == n else 0  # another size asked for: start over
    out = np.lib.format.open_memmap(tmp, mode="r+" if done else "w+", dtype=np.float32, shape=(n, d))
    start = time.time()
    for row in range(done, n, CHUNK):
        torch.manual_seed(TRAIN_SEED + row // CHUNK)
        out[row:row + CHUNK] = model.sample(min(CHUNK, n - row)).numpy()
        out.flush()
        write_json(progress, {"n": n, "rows": min(row + CHUNK, n)})
        rate = (min(row + CHUNK, n) - done) / (time.time() - start)
        print(f"samples {min(row + CHUNK, n):,}/{n:,} ({rate:.0f}/s)", flush=True)
    del out
    os.replace(tmp, path)
    os.remove(progress)


def score(model_dir, sae_dir, n=50_000, batch_size=1024):
    """SAELens's evaluation (eval_sae_on_synthetic_data) of the SAELens SAE in sae_dir on n fresh samples drawn after
    EVAL_SEED (never a training sample's seed) -> its result as a dict: explained_variance, mcc, classification's
    f1_score / precision / recall, sae_l0, true_l0, dead_latents (over these n samples), shrinkage, uniqueness."""
    import torch
    from sae_lens import SAE
    from sae_lens.synthetic import eval_sae_on_synthetic_data
    model = load_bench(model_dir)
    sae = SAE.load_from_disk(sae_dir, device="cpu", dtype="float32")
    with torch.random.fork_rng():
        torch.manual_seed(EVAL_SEED)
        result = eval_sae_on_synthetic_data(sae, model.feature_dict, model.activation_generator, num_samples=n,
                                            batch_size=batch_size)
    return result.to_dict()


def matryoshka_widths(d_sae):
    return [int(d_sae * f) for f in MATRYOSHKA_FRACTIONS]


def train_saelens(model_dir, arch, samples, out_dir, d_sae=4096, k=25, batch_size=BATCH):
    """SAELens's own trainer (SyntheticSAERunner) on `samples` fresh samples (its stream, seeded TRAIN_SEED), saved as
    its inference SAE in out_dir (batchtopk and matryoshka as the JumpReLU they are at inference)."""
    import torch
    import sae_lens
    from sae_lens.synthetic import SyntheticSAERunner, SyntheticSAERunnerConfig
    model = load_bench(model_dir)
    d_in = model.cfg.hidden_dim
    sae_config = getattr(sae_lens, SAELENS_ARCHS[arch] + "TrainingSAEConfig")
    extra = {"matryoshka_widths": matryoshka_widths(d_sae)} if arch == "matryoshka" else {}
    config = SyntheticSAERunnerConfig(synthetic_model=model_dir, sae=sae_config(d_in=d_in, d_sae=d_sae, k=k, **extra),
                                      training_samples=samples, batch_size=batch_size, device="cpu",
                                      output_path=out_dir, eval_samples=0,
                                      logger=sae_lens.LoggingConfig(log_to_wandb=False))
    torch.manual_seed(TRAIN_SEED)
    SyntheticSAERunner(config, override_synthetic_model=model).run()


# -----------------------------------------------------------------------------------------------------------------
# our side: one command from the published config to scores, each step skipped where its output exists

def saelens_python():
    python = os.environ.get("SAELENS_PYTHON", "")
    if not python:
        raise SystemExit("error: SAELENS_PYTHON is not set: an interpreter with sae-lens==6.54.12 "
                         "(python -m venv saelens-venv && saelens-venv/bin/pip install torch==2.13.0 sae-lens==6.54.12)")
    return python


def matryoshka_flag(arch, d_sae):
    return [f"--matryoshka_prefixes={tuple(matryoshka_widths(d_sae))}"] if arch == "matryoshka" else []


def step(cmd, log):
    """cmd run to completion, its output in log; a failure ends the run with the log's last line."""
    with open(log, "a") as f:
        done = subprocess.run(cmd, cwd=HERE, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        last = [line for line in open(log).read().splitlines() if line.strip()][-1:] or ["(no output)"]
        raise SystemExit(f"error: {' '.join(map(str, cmd[:3]))} ... failed (see {log}): {last[0]}")


def last_eval_iter(sae_dir):
    """The iteration of the last evaluation in sae_dir's log.jsonl (sae.py evaluates and saves at each stop), or 0."""
    path = os.path.join(sae_dir, "log.jsonl")
    iters = [json.loads(line)["iter"] for line in open(path) if line.strip()] if os.path.exists(path) else []
    return max(iters, default=0)


def train_ours(args, arch, samples, sae_dir, stop, export, log):
    """sae.py on the samples to iteration `stop` (a new run, or the one in sae_dir continued from its checkpoint: a
    stopped run, or the curve's previous point; with a constant learning rate the points are one run's), then
    analyze.py's SAELens export of it into `export`."""
    ours = sys.executable
    if last_eval_iter(sae_dir) > stop:
        raise SystemExit(f"error: {sae_dir} is trained past {stop * args.batch_size:,} samples: score a point before "
                         f"training past it (a new --out_dir starts over)")
    flags = [f"--acts={samples}", *SHAPE, f"--batch_size={args.batch_size}", f"--d_sae={args.d_sae}", f"--k={args.k}",
             *RECIPES[args.recipe], *ARCHS[arch], *matryoshka_flag(arch, args.d_sae),
             *args.sae_flags.split()]  # the variant's last: it wins
    if os.path.exists(os.path.join(sae_dir, "ckpt.pt")):  # a run that stopped, or the curve's last point: continued
        flags = ["--init_from=resume"]
    step([ours, os.path.join(HERE, "sae.py"), *flags, f"--max_iters={stop}", f"--eval_interval={stop}",
          f"--out_dir={sae_dir}"], log)
    step([ours, os.path.join(HERE, "analyze.py"), "--mode=export", "--export_format=saelens", f"--out_dir={sae_dir}",
          f"--export_dir={export}"], log)


def run(args):
    """Model, samples, then for each architecture: sae.py on the samples, analyze.py's SAELens export, SAELens's score,
    at each point of --curve and at the end; with --trainers=...,saelens SAELens's own trainer at the same budgets
    (a run of its own for each). One JSON line a result in OUT_DIR/results.jsonl (samples seen, distinct samples,
    the scores)."""
    python = saelens_python()
    os.makedirs(args.out_dir, exist_ok=True)
    log = lambda name: os.path.join(args.out_dir, f"{name}.log")
    trainers = args.trainers.split(",")
    if not os.path.isdir(args.model_dir):
        step([python, ME, "--mode=build", f"--model_dir={args.model_dir}", f"--config={args.config}"], log("build"))
    samples = os.path.join(args.data_dir, f"train_{args.samples}.npy")
    if not os.path.exists(samples) and "gpt_sae" in trainers:  # SAELens's trainer draws its own
        os.makedirs(args.data_dir, exist_ok=True)
        step([python, ME, "--mode=samples", f"--model_dir={args.model_dir}", f"--samples={args.samples}",
              f"--out={samples}"], log("samples"))
    distinct = args.samples - min(N_VAL, args.samples // 10)  # sae.py holds the first rows out (N_VAL at most)
    iters = distinct * args.epochs // args.batch_size
    stops = sorted({int(seen) // args.batch_size for seen in args.curve.split(",") if seen} | {iters})
    for arch in args.archs.split(","):
        # the run's name: the recipe (but the first), distinct samples x passes, then a variant's batch size and flags
        name = (f"gpt_sae-{arch}" + f"-{args.recipe}" * (args.recipe != "base") + f"-{args.samples}"
                + f"x{args.epochs}" * (args.epochs > 1)
                + f"-b{args.batch_size}" * (args.batch_size != BATCH)
                + "".join(f"-{flag.lstrip('-')}" for flag in args.sae_flags.split()))
        sae_dir = os.path.join(args.out_dir, name)
        for stop in stops * ("gpt_sae" in trainers):  # the curve's points, then the end: one run
            seen = stop * args.batch_size
            at = "" if stop == iters else f"-{seen}"
            export, scored = os.path.join(sae_dir, "export" + at), os.path.join(sae_dir, f"score{at}.json")
            if recorded(args.out_dir, name, seen):
                continue
            if not os.path.exists(os.path.join(export, "cfg.json")):
                train_ours(args, arch, samples, sae_dir, stop, export, log(name))
            score_and_record(args, "gpt_sae", arch, name, export, scored, seen, distinct, log(name))
        for seen in [stop * args.batch_size for stop in stops] * ("saelens" in trainers):  # a fresh run a budget
            saelens_name = f"saelens-{arch}-{seen}"
            saelens_dir = os.path.join(args.out_dir, saelens_name)
            if recorded(args.out_dir, f"saelens-{arch}", seen):
                continue
            if not os.path.exists(os.path.join(saelens_dir, "cfg.json")):
                step([python, ME, "--mode=saelens", f"--model_dir={args.model_dir}", f"--arch={arch}",
                      f"--samples={seen}", f"--d_sae={args.d_sae}", f"--k={args.k}", f"--out={saelens_dir}"],
                     log(saelens_name))
            score_and_record(args, "saelens", arch, f"saelens-{arch}", saelens_dir,
                             os.path.join(saelens_dir, "score.json"), seen, seen, log(saelens_name))


def recorded(out_dir, name, seen):
    """Whether results.jsonl holds run `name` at `seen` samples: a point's last write, so that a run stopped between
    its score and its line gets the line (from the score file) when run again."""
    path = os.path.join(out_dir, "results.jsonl")
    lines = [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []
    return any(r.get("run") == name and r["samples_seen"] == seen for r in lines)


def score_and_record(args, trainer, arch, name, export, scored, seen, distinct, log):
    """SAELens's score of the SAE in export (in SAELens's interpreter) into `scored` (kept where a stopped run left
    it), then its line in results.jsonl and on stdout."""
    if not os.path.exists(scored):
        step([saelens_python(), ME, "--mode=score", f"--model_dir={args.model_dir}", f"--sae_dir={export}",
              f"--eval_samples={args.eval_samples}", f"--out={scored}"], log)
    ours = trainer == "gpt_sae"
    result = {"run": name, "trainer": trainer, "arch": arch, "recipe": args.recipe if ours else "saelens",
              "sae_flags": args.sae_flags if ours else "",
              "batch_size": args.batch_size if ours else BATCH, "samples_seen": seen, "distinct_samples": distinct,
              **json.load(open(scored))}
    with open(os.path.join(args.out_dir, "results.jsonl"), "a") as f:
        f.write(json.dumps(result) + "\n")
    c = result["classification"]
    print(f"{name} at {seen:,}: EV {result['explained_variance']:.3f} | MCC {result['mcc']:.3f}"
          f" | F1 {c['f1_score']:.3f} | L0 {result['sae_l0']:.1f} | dead {result['dead_latents']}", flush=True)


# the published best at L0 25, the goal these runs chase: Matching Pursuit's EV, Matryoshka's MCC and F1, 200M samples
PUBLISHED_BEST = {"explained_variance": 0.835, "mcc": 0.793, "f1_score": 0.879}


def curves_in(results_path):
    """results.jsonl's lines grouped into curves, each sorted by samples seen: one trainer, architecture and recipe
    (its variant's flags, its batch size, its distinct samples) at several budgets, the points of one run or of runs
    of a constant learning rate that differ in passes only (the same trajectory); SAELens's at any number of budgets."""
    curves = {}
    for line in open(results_path):
        r = json.loads(line)
        r["f1_score"] = r["classification"]["f1_score"]
        name = " ".join([r["trainer"], r["arch"]] + [r.get("recipe", "base"), r.get("sae_flags", ""),
                        f"batch {r.get('batch_size', BATCH)}", f"{r['distinct_samples']:,} distinct"]
                        * (r["trainer"] == "gpt_sae"))
        curves.setdefault(" ".join(name.split()), []).append(r)
    return {name: sorted(points, key=lambda r: r["samples_seen"]) for name, points in curves.items()
            if len({r["samples_seen"] for r in points}) > 1 or points[0]["trainer"] == "saelens"}


def plot_curves(results_path, out_path, published=PUBLISHED_BEST):
    """EV, MCC, F1 and dead latents against samples seen (log scale) from results.jsonl, a line per curve
    (curves_in), the published best dotted."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise SystemExit("error: --mode=plot needs matplotlib: pip install matplotlib") from None
    curves = curves_in(results_path)
    if not curves:
        raise SystemExit(f"error: {results_path} holds no run scored at two budgets or more (--curve)")
    fig, axes = plt.subplots(1, 4, figsize=(18, 5.5))
    for ax, key, label in zip(axes, ["explained_variance", "mcc", "f1_score", "dead_latents"],
                              ["EV", "MCC", "F1", "dead latents (of d_sae, over the scored samples)"]):
        for i, (name, points) in enumerate(curves.items()):  # tab20: a colour of its own for each of 20 curves
            ax.plot([r["samples_seen"] for r in points], [r[key] for r in points], "o-" if "gpt_sae" in name else "s--",
                    label=name, markersize=4, color=plt.cm.tab20(i % 20))
        if key in published:
            ax.axhline(published[key], color="gray", linestyle=":", label="published best (200M samples)")
        ax.set_xscale("log"), ax.set_xlabel("samples seen"), ax.set_title(label), ax.grid(alpha=0.3)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # 10^5, 10^6, ... only: the minor ones collide
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)  # below the panels, covering none
    fig.tight_layout(rect=(0, 0.045 * -(-len(labels) // 3) + 0.02, 1, 1))  # room for the legend's rows
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path + ".tmp.png", dpi=110)
    os.replace(out_path + ".tmp.png", out_path)
    return out_path


FIT_BUDGETS = 4  # the fewest distinct budgets a saturating fit takes (three parameters, and one point to spare)


def fit_saturating(seen, values, most=1.0):
    """The curve y(n) = top - gap * (n / n0) ** -rate nearest the points in least squares, its top at most `most`
    (EV, MCC and F1 are at most 1): a quantity that rises ever more slowly toward `top`, the usual shape of a
    learning curve. The rate on a log grid; top and gap in closed form for each (top held at `most` where the free
    fit would pass it: a curve still rising steadily then becomes a power law toward the perfect score). Returns
    (top, gap, rate, n0). Four budgets or more: three parameters pass through three points and predict nothing."""
    n, y = np.asarray(seen, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if len(set(seen)) < FIT_BUDGETS:
        raise ValueError(f"a saturating fit needs four budgets or more, got {len(set(seen))}")
    best = None
    for rate in np.geomspace(0.01, 3.0, 600):
        x = (n / n[0]) ** -rate  # (points,)
        design = np.stack([np.ones_like(x), -x], axis=1)  # (points, 2) @ (top, gap) -> (points,)
        (top, gap), *_ = np.linalg.lstsq(design, y, rcond=None)
        if top > most:  # the bound: y = most - gap * x, gap the least-squares slope of (most - y) on x
            top, gap = most, float(x @ (most - y) / (x @ x))
        error = float(np.sum((top - gap * x - y) ** 2))
        if best is None or error < best[0]:
            best = (error, float(top), float(gap), float(rate))
    return best[1], best[2], best[3], float(n[0])


def samples_to_reach(goal, top, gap, rate, n0):
    """Samples seen at which the fitted curve reaches `goal`; None where it never does (goal at or above its top)."""
    if top <= goal or gap <= 0:
        return None
    return n0 * (gap / (top - goal)) ** (1 / rate)


def predict_curves(results_path, at=20_000_000, published=PUBLISHED_BEST):
    """For each curve of four budgets or more (curves_in): EV, MCC and F1 fitted by fit_saturating, the fit at `at`
    samples seen, its ceiling and the samples it needs to reach the published best. A Markdown table: an
    extrapolation from the points measured, no more (a curve over repeated samples flattens as the repeats stop
    teaching, so its ceiling is the repeats', not the recipe's)."""
    rows = ["| curve | budgets | metric | last measured | fit at %s | ceiling | samples to the published best |"
            % f"{at / 1e6:g}M", "|---|---|---|---:|---:|---:|---:|"]
    for name, points in curves_in(results_path).items():
        if len({r["samples_seen"] for r in points}) < FIT_BUDGETS:
            continue
        seen = [r["samples_seen"] for r in points]
        budgets = ", ".join(f"{n / 1e6:.2g}M" for n in seen)
        for key, label in [("explained_variance", "EV"), ("mcc", "MCC"), ("f1_score", "F1")]:
            top, gap, rate, n0 = fit_saturating(seen, [r[key] for r in points])
            needed = samples_to_reach(published[key], top, gap, rate, n0)
            rows.append(f"| {name} | {budgets} | {label} | {points[-1][key]:.3f} | "
                        f"{top - gap * (at / n0) ** -rate:.3f} | {top:.3f} | "
                        + ("never" if needed is None else f"{needed:.1e}") + " |")
    if len(rows) == 2:
        raise SystemExit(f"error: {results_path} holds no curve of four budgets or more (--curve)")
    return "\n".join(rows)


# -----------------------------------------------------------------------------------------------------------------
# known directions: our own small benchmark (no SAELens), run by `bench.py --synthetic=True`. Two regimes: 96
# directions in 48 dimensions, 4 active a row (the tests' fixture), and heavy superposition, 512 in 32 (16x), 3 active.
# Every architecture over its sparsity setting in one sae.py sweep (shared batches, Adam at 3e-3, 512 rows a step);
# then each at its best setting with the JL penalty added over three decades. Best = the highest mean max cosine of
# the true directions.

def synthetic_activations(n, d, n_true, k, seed=0):
    """Activations with a known answer: each row a sum of k of n_true random unit directions (drawn with
    Zipf-like frequencies p_i ~ 1/sqrt(i)), with non-negative magnitudes U(0.5, 1.5).
    -> (X (n, d) float32, true directions (n_true, d) float32)"""
    g = np.random.default_rng(seed)
    D = g.standard_normal((n_true, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    p = 1 / np.sqrt(np.arange(1, n_true + 1))
    X = np.zeros((n, d))
    for i in range(n):
        active = g.choice(n_true, size=k, replace=False, p=p / p.sum())
        X[i] = g.uniform(0.5, 1.5, size=k) @ D[active]  # (k,) @ (k, d) -> (d,)
    return X.astype(np.float32), D.astype(np.float32)


REGIMES = [  # name, rows, d, true directions, active per row, d_sae, steps
    ("96 in 48, 4 active", 40000, 48, 96, 4, 192, 1500),
    ("512 in 32, 3 active (16x)", 100000, 32, 512, 3, 1024, 2000)]
DIRECTIONS_RUN = ["--batch_size=512", "--lr=0.003", "--sparsity_warmup_iters=100", "--jl_decay_iters=300",
                  "--eval_tokens=4000", "--log_interval=500", "--resample_iters=()"]
SWEPT_SETTING = {"relu": "l1_coeff", "topk": "k", "batchtopk": "k", "matryoshka": "k", "fsq": "k",
                 "jumprelu": "l0_coeff", "vae": "kl_coeff"}  # the key each architecture is swept over
# each form's coefficients, three decades where its pull on a row at random spread (d 32, 1024 rows) spans atanh's:
# power (p 4) pulls 14x and welch 8x less than atanh there (measured; the runs: docs/results.md, "The JL penalty's
# forms")
JL_COEFFS = {"atanh": "[1e2, 1e3, 1e4]", "power": "[1e3, 1e4, 1e5]", "welch": "[1e3, 1e4, 1e5]"}


def train_directions_sweep(out, acts, d_sae, steps, flags, env):
    """One sae.py process training a sweep on acts; -> [(name, checkpoint, final eval)]."""
    import torch
    r = subprocess.run([sys.executable, os.path.join(HERE, "sae.py"), f"--acts={acts}", f"--out_dir={out}",
                        f"--d_sae={d_sae}", f"--max_iters={steps}", f"--eval_interval={steps}",
                        f"--dead_window={50 * 512}", *DIRECTIONS_RUN, *flags],
                       cwd=HERE, env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{flags}: {r.stderr.strip().splitlines()[-1]}")
    names = json.load(open(f"{out}/sweep.json"))["names"] if os.path.exists(f"{out}/sweep.json") else [""]
    return [(name, torch.load(os.path.join(out, name, "ckpt.pt"), weights_only=True),
             json.loads(open(os.path.join(out, name, "log.jsonl")).readlines()[-1])) for name in names]


def score_recovery(D, checkpoint, final):
    """How well the checkpoint's decoder rows recover the true directions D (n_true, d): each direction's highest
    cosine with a row (signed: a row pointing the opposite way recovers nothing), their mean and the fraction above
    0.9, beside the run's final L0, FVU and its rows' own mean max |cos| (final: its last log.jsonl line)."""
    import torch
    W = torch.nn.functional.normalize(checkpoint["sae"]["W_dec"].float(), dim=1)
    max_cos = (torch.from_numpy(D) @ W.T).max(dim=1).values  # (n_true, d) @ (d, d_sae), max over rows -> (n_true,)
    cfg = checkpoint["config"]
    key = SWEPT_SETTING[cfg["arch"]]
    form = "" if cfg.get("jl_form", "atanh") == "atanh" else f" {cfg['jl_form']}"
    setting = f"{key}={cfg[key]}" + (f"{form} jl_coeff={cfg['jl_coeff']:g}" if cfg["loss"] == "hybrid" else "")
    return {"arch": cfg["arch"], "setting": setting, "mean_max_cos": max_cos.mean().item(),
            "frac_above_0.9": (max_cos > 0.9).float().mean().item(), "l0": final["l0"], "fvu": final["fvu"],
            "dictionary_max_cos": final["mean_max_cos"]}


def run_known_directions(regime=0, archs="", jl_form="atanh"):
    """The benchmark in regime (1-based index into REGIMES; 0 = every one), for archs (comma-separated; "" = every
    architecture of SWEPT_SETTING), the JL penalty of form jl_form; prints a table a regime -> every SAE's scores."""
    # without TRITON_INTERPRET (the tests' setting): sae.py runs its CPU code, not Triton's interpreter
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    results = []
    if not 0 <= regime <= len(REGIMES):
        raise ValueError(f"--regime={regime}: 0 (all) or one of 1..{len(REGIMES)}")
    for label, n, d, n_true, k_true, d_sae, steps in (REGIMES[regime - 1:regime] if regime else REGIMES):
        X, D = synthetic_activations(n=n, d=d, n_true=n_true, k=k_true, seed=0)
        ks = sorted({max(1, k_true // 2), k_true, 2 * k_true})
        print(f"synthetic: {label}; SAEs of {d_sae} features, {steps} steps")
        print(f"  {'arch':<11} {'setting':<34} {'mean max cos':>12} {'frac > 0.9':>10} {'L0':>6} {'FVU':>7} "
              f"{'rows max cos':>12}")
        with tempfile.TemporaryDirectory() as tmp:
            acts = os.path.join(tmp, "acts.npy")
            np.save(acts, X)
            swept = [a for a in SWEPT_SETTING if a in archs.split(",")] if archs else list(SWEPT_SETTING)
            sweep = [f"--arch={','.join(swept)}", "--l1_coeff=[0.1, 0.3, 1.0, 3.0]", f"--k={ks}",
                     "--l0_coeff=[0.03, 0.3, 3.0]", "--kl_coeff=[0.01, 0.1, 1.0]"]
            rows = [score_recovery(D, ckpt, final) for _, ckpt, final in
                    train_directions_sweep(os.path.join(tmp, "all"), acts, d_sae, steps, sweep, env)]
            for arch in swept:  # JL added to each architecture at its best setting
                best = max((r for r in rows if r["arch"] == arch), key=lambda r: r["mean_max_cos"])
                flags = [f"--arch={arch}", f"--{best['setting']}", "--loss=hybrid", f"--jl_form={jl_form}",
                         f"--jl_coeff={JL_COEFFS[jl_form]}"]
                rows += [score_recovery(D, ckpt, final) for _, ckpt, final in
                         train_directions_sweep(os.path.join(tmp, arch), acts, d_sae, steps, flags, env)]
        for e in rows:
            e["regime"] = label
            print(f"  {e['arch']:<11} {e['setting']:<34} {e['mean_max_cos']:12.3f} {e['frac_above_0.9']:10.2f} "
                  f"{e['l0']:6.1f} {e['fvu']:7.3f} {e['dictionary_max_cos']:12.3f}")
        results += rows
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", default="run", choices=["run", "build", "samples", "score", "saelens", "plot", "predict"])
    p.add_argument("--archs", default="matryoshka", help="run: comma-separated, of " + ", ".join(ARCHS)
                   + " (matryoshka: the best measured, docs/results.md \"Known features\")")
    p.add_argument("--recipe", default="few_samples", choices=sorted(RECIPES), help="run: sae.py's settings (RECIPES)")
    p.add_argument("--arch", default="batchtopk", choices=sorted(SAELENS_ARCHS), help="saelens: the architecture")
    p.add_argument("--samples", type=int, default=500_000, help="distinct training samples (saelens: samples seen)")
    p.add_argument("--d_sae", type=int, default=4096, help="features (the benchmark's width)")
    p.add_argument("--k", type=int, default=25, help="active features per sample (the benchmark's L0)")
    p.add_argument("--sae_flags", default="", help="run: sae.py flags over the recipe's, e.g. '--lr=3e-3 --decay=linear'")
    p.add_argument("--config", default=BENCH_CONFIG, help="build: the benchmark model's config")
    p.add_argument("--epochs", type=int, default=1, help="run: passes over the samples")
    p.add_argument("--batch_size", type=int, default=BATCH, help="run: samples a step (ours; SAELens's stay at 1024)")
    p.add_argument("--curve", default="", help="run: also scored at these samples seen (comma-separated), checkpoints\n"
                   "of the one run (a constant learning rate after any warmup); SAELens's: a run each")
    p.add_argument("--trainers", default="gpt_sae", help="run: gpt_sae (ours), saelens (SAELens's own trainer, its\n"
                   "defaults, at the same budgets) or both, comma-separated")
    p.add_argument("--model_dir", default=os.path.join(HERE, "data", "synthsaebench", "model"))
    p.add_argument("--data_dir", default=os.path.join(HERE, "data", "synthsaebench"))
    p.add_argument("--out_dir", default=os.path.join(HERE, "out", "synthsaebench"))
    p.add_argument("--sae_dir", help="score: a SAELens SAE directory")
    p.add_argument("--eval_samples", type=int, default=50_000)
    p.add_argument("--orthogonalization_steps", type=int, help="build: fewer than the config's (not the benchmark)")
    p.add_argument("--out", help="samples: the .npy; score: the JSON; saelens: the SAE's directory; plot: the PNG\n"
                   "(default figures/synthsaebench/curves.png)")
    args = p.parse_args(argv)
    if args.mode == "run":
        if not set(args.trainers.split(",")) <= {"gpt_sae", "saelens"}:
            raise SystemExit(f"error: --trainers={args.trainers}: valid: gpt_sae, saelens, or both (comma-separated)")
        unknown = [a for a in args.archs.split(",") if a not in ARCHS]
        if unknown:
            raise SystemExit(f"error: --archs={args.archs}: no recipe for {', '.join(unknown)}; valid: {', '.join(ARCHS)}")
        decays = [flag for flag in args.sae_flags.split() if flag.startswith("--decay=") and flag != "--decay=constant"]
        if args.curve and decays:
            raise SystemExit(f"error: --curve with {args.sae_flags}: a decaying learning rate ends at each point; run "
                             "each budget on its own (--samples, --epochs)")
        run(args)
    elif args.mode == "build":
        build_bench(args.model_dir, args.config, args.orthogonalization_steps)
    elif args.mode == "samples":
        write_samples(args.model_dir, args.out, args.samples)
    elif args.mode == "score":
        result = score(args.model_dir, args.sae_dir, args.eval_samples)
        if args.out:
            write_json(args.out, result)
        print(json.dumps(result, indent=1))
    elif args.mode == "plot":  # of OUT_DIR/results.jsonl
        print(plot_curves(os.path.join(args.out_dir, "results.jsonl"),
                          args.out or os.path.join(HERE, "figures", "synthsaebench", "curves.png")))
    elif args.mode == "predict":  # of OUT_DIR/results.jsonl: each curve extrapolated to 20M samples seen
        print(predict_curves(os.path.join(args.out_dir, "results.jsonl")))
    else:
        train_saelens(args.model_dir, args.arch, args.samples, args.out, args.d_sae, args.k)


if __name__ == "__main__":
    main()
