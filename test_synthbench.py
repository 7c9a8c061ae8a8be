"""synthbench.py: the harness that scores our SAEs on SynthSAEBench's known features with SAELens's code. Its pieces run
in SAELens's own interpreter ($SAELENS_PYTHON, sae-lens 6.54.12); without one the end-to-end test skips with the
reason (CI has none: SAELens is not a dependency). The scores are checked against the definitions computed here
from the files the harness wrote: the exported SAE's forward by SAELens's JumpReLU formula, the MCC by a Hungarian
matching of our decoder rows to the benchmark's directions. The known-directions benchmark (bench.py --synthetic=True)
is checked here on its own: its activations are the sums it promises, its score is 1 for a decoder holding the
directions."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import cpu_env

HERE = Path(__file__).parent
SAELENS_PYTHON = os.environ.get("SAELENS_PYTHON", "")


def synthbench(*args, env=None):
    return subprocess.run([sys.executable, str(HERE / "synthbench.py"), *map(str, args)], cwd=HERE,
                          capture_output=True, text=True, env={**cpu_env(), **(env or {})}, timeout=1200)


def test_synthbench_without_saelens_or_with_an_unknown_arch_is_one_line(tmp_path):
    r = synthbench(f"--out_dir={tmp_path}", env={"SAELENS_PYTHON": ""})
    assert r.returncode == 1 and r.stderr.startswith("error: SAELENS_PYTHON is not set: an interpreter with "
                                                     "sae-lens==6.54.12") and len(r.stderr.strip().splitlines()) == 1
    r = synthbench("--archs=batchtopk,gated", env={"SAELENS_PYTHON": sys.executable})
    assert r.returncode == 1 and r.stderr.strip() == ("error: --archs=batchtopk,gated: no recipe for gated; valid: topk, "
                                                      "batchtopk, matryoshka, relu, jumprelu")
    r = synthbench("--trainers=gpt_sae,dictionary_learning", env={"SAELENS_PYTHON": sys.executable})
    assert r.returncode == 1 and r.stderr.strip() == ("error: --trainers=gpt_sae,dictionary_learning: valid: gpt_sae, "
                                                      "saelens, or both (comma-separated)")
    r = synthbench("--curve=250000", "--sae_flags=--decay=cosine", env={"SAELENS_PYTHON": sys.executable})
    assert r.returncode == 1 and r.stderr.startswith("error: --curve with --decay=cosine: a decaying learning rate")


def test_the_saturating_fit_recovers_a_known_learning_curve(tmp_path):
    """fit_saturating against curves whose truth is known: y = 0.8 - 0.5 (n / 1e5)^-0.4 at five budgets comes back
    (its ceiling, its value at 20M and the samples it takes to reach 0.75, solved here by hand); a curve that rises
    steadily past 1 is held to a top of 1; three budgets are refused. --mode=predict tabulates a results.jsonl of
    such a curve and skips SAELens's two-point one."""
    from synthbench import fit_saturating, samples_to_reach
    seen = [100_000, 250_000, 500_000, 1_000_000, 2_000_000]
    truth = lambda n: 0.8 - 0.5 * (n / 1e5) ** -0.4
    top, gap, rate, n0 = fit_saturating(seen, [truth(n) for n in seen])
    assert abs(top - 0.8) < 2e-3 and abs(rate - 0.4) < 5e-3
    assert abs(top - gap * (2e7 / n0) ** -rate - truth(2e7)) < 2e-3
    assert abs(samples_to_reach(0.75, top, gap, rate, n0) / (1e5 * 10 ** (1 / 0.4)) - 1) < 0.05
    assert samples_to_reach(0.9, top, gap, rate, n0) is None  # above the ceiling: never
    steady = [0.2 + 0.1 * np.log2(n / 1e5) for n in seen]  # +0.1 a doubling, no sign of slowing
    top, gap, rate, n0 = fit_saturating(seen, steady)
    assert top == 1.0 and max(abs(top - gap * (n / n0) ** -rate - y) for n, y in zip(seen, steady)) < 0.03
    with pytest.raises(ValueError, match="four budgets or more, got 3"):
        fit_saturating(seen[:3], steady[:3])
    line = lambda trainer, n, y: json.dumps({
        "run": f"{trainer}-topk", "trainer": trainer, "arch": "topk", "recipe": "few_samples", "sae_flags": "",
        "batch_size": 1024, "samples_seen": n, "distinct_samples": 491_808, "explained_variance": y, "mcc": y,
        "classification": {"f1_score": y}})
    (tmp_path / "results.jsonl").write_text("\n".join([line("gpt_sae", n, truth(n)) for n in seen]
                                                      + [line("saelens", n, 0.2) for n in seen[:2]]) + "\n")
    r = synthbench("--mode=predict", f"--out_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    rows = [row.split(" | ") for row in r.stdout.splitlines()[2:]]
    assert [row[2] for row in rows] == ["EV", "MCC", "F1"] and all(row[0].startswith("| gpt_sae topk") for row in rows)
    assert all(abs(float(row[4]) - truth(2e7)) < 2e-3 for row in rows)
    assert [row[6] == "never |" for row in rows] == [True, False, True]  # a ceiling of 0.8: above MCC's 0.793 only


def test_known_directions_are_sums_of_k_directions_and_a_decoder_holding_them_scores_1():
    """synthetic_activations: each row k of the unit directions with magnitudes in [0.5, 1.5] (read back exactly:
    6 directions in 12 dimensions are independent); score_recovery: 1 for a decoder whose rows include the directions
    (with one row the negative of one: a direction's best row is signed), less for one missing a direction."""
    import torch
    from synthbench import score_recovery, synthetic_activations
    X, D = synthetic_activations(n=300, d=12, n_true=6, k=2, seed=0)
    assert X.shape == (300, 12) and D.shape == (6, 12) and X.dtype == D.dtype == np.float32
    assert np.allclose(np.linalg.norm(D, axis=1), 1, atol=1e-6)
    M = X.astype(np.float64) @ np.linalg.pinv(D.astype(np.float64))  # (300, 12) @ (12, 6): each row's magnitudes
    active = np.abs(M) > 1e-4
    assert (active.sum(1) == 2).all() and (M[active] >= 0.5 - 1e-4).all() and (M[active] <= 1.5 + 1e-4).all()
    assert active[:, 0].sum() > active[:, 5].sum()  # Zipf-like: the first direction fires most often
    rows = torch.from_numpy(np.concatenate([D, -D[:1], np.eye(12, dtype=np.float32)[:3]]))  # (10, 12)
    config = {"arch": "topk", "k": 2, "loss": "hybrid", "jl_form": "power", "jl_coeff": 1000.0}
    final = {"l0": 2.0, "fvu": 0.1, "mean_max_cos": 0.3}
    score = score_recovery(D, {"sae": {"W_dec": 3 * rows}, "config": config}, final)  # rows of any norm
    assert score["mean_max_cos"] == pytest.approx(1, abs=1e-6) and score["frac_above_0.9"] == 1
    assert score["setting"] == "k=2 power jl_coeff=1000" and (score["l0"], score["fvu"], score["dictionary_max_cos"]) == (2, 0.1, 0.3)
    missing = score_recovery(D, {"sae": {"W_dec": rows[1:]}, "config": {"arch": "relu", "l1_coeff": 3.0, "loss": "l1"}}, final)
    assert missing["mean_max_cos"] < 1 - 1e-3 and missing["frac_above_0.9"] == pytest.approx(5 / 6)
    assert missing["setting"] == "l1_coeff=3.0"


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """The harness run end to end on a small sibling of the benchmark (512 features in 48 dimensions, its hierarchy,
    correlations and magnitudes as the published config has them): batchtopk, 128 features, k 4, 30,000 samples."""
    if not SAELENS_PYTHON:
        pytest.skip("SAELENS_PYTHON is not set: an interpreter with sae-lens==6.54.12 (its own venv) runs the benchmark")
    root = tmp_path_factory.mktemp("synthbench")
    config = json.load(open(HERE / "config" / "synthsaebench_16k.json"))
    config.update(num_features=512, hidden_dim=48)
    config["hierarchy"].update(total_root_nodes=8, branching_factor=3, max_depth=2)
    config["orthogonalization"]["num_steps"] = 10
    config["correlation"]["rank"] = 4
    (root / "tiny.json").write_text(json.dumps(config))
    r = synthbench(f"--config={root / 'tiny.json'}", "--archs=batchtopk", "--samples=30000", "--d_sae=128", "--k=4",
                   "--eval_samples=20000", f"--model_dir={root / 'model'}", f"--data_dir={root / 'data'}",
                   f"--out_dir={root / 'out'}", env={"SAELENS_PYTHON": SAELENS_PYTHON})
    assert r.returncode == 0, r.stderr + r.stdout
    return root


def test_synthbench_scores_are_the_definitions_on_the_exported_sae(tiny_bench):
    out = tiny_bench / "out" / "gpt_sae-batchtopk-few_samples-30000"
    result = json.loads((tiny_bench / "out" / "results.jsonl").read_text().splitlines()[0])
    n_val = 3000  # sae.py holds out min(8192, N / 10) rows, never trained on
    assert result["samples_seen"] == (30000 - n_val) // 1024 * 1024 and result["distinct_samples"] == 30000 - n_val
    # the exported SAE by SAELens's JumpReLU formula (batchtopk at inference), on the held-out rows of the samples
    w = load_file(out / "export" / "sae_weights.safetensors")
    x = np.load(tiny_bench / "data" / "train_30000.npy")[:n_val].astype(np.float64)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]  # (n, 48) @ (48, 128)
    z = np.where(pre > w["threshold"], np.maximum(pre, 0), 0)
    x_hat = z @ w["W_dec"] + w["b_dec"]  # (n, 128) @ (128, 48)
    ev = 1 - ((x - x_hat) ** 2).sum(1).mean() / ((x ** 2).sum(1).mean() - (x.mean(0) ** 2).sum())
    l0 = (z != 0).sum(1).mean()
    # SAELens scored 20,000 fresh samples of the same distribution: equal up to the sampling of the two sets
    assert abs(result["explained_variance"] - ev) < 0.03 and abs(result["sae_l0"] - l0) < 0.1 * l0, (result, ev, l0)
    assert 0 < ev < 1 and result["true_l0"] > 4
    # MCC: a one-to-one matching of decoder rows to the true directions maximising the mean |cos| (scipy's Hungarian
    # solver, in SAELens's interpreter: scipy is not ours), from the two weight files alone
    code = ("import sys, numpy as np; from safetensors.numpy import load_file; "
            "from scipy.optimize import linear_sum_assignment as lsa; "
            "W = load_file(sys.argv[1])['W_dec']; V = load_file(sys.argv[2])['feature_vectors']; "
            "C = np.abs((W / np.linalg.norm(W, axis=1, keepdims=True)) @ (V / np.linalg.norm(V, axis=1, keepdims=True)).T); "
            "r, c = lsa(-C); print(C[r, c].mean())")
    mcc = subprocess.run([SAELENS_PYTHON, "-c", code, str(out / "export" / "sae_weights.safetensors"),
                          str(tiny_bench / "model" / "synthetic_model.safetensors")], capture_output=True, text=True)
    assert mcc.returncode == 0, mcc.stderr
    assert abs(float(mcc.stdout) - result["mcc"]) < 1e-5, (mcc.stdout, result["mcc"])


def test_synthbench_samples_continue_where_an_interrupted_write_stopped(tiny_bench, tmp_path):
    """Chunk i is drawn after seed i: a write stopped after its first chunk and called again gives the same file."""
    whole = np.load(tiny_bench / "data" / "train_30000.npy")
    path = tmp_path / "train.npy"
    partial = np.lib.format.open_memmap(str(path) + ".tmp", mode="w+", dtype=np.float32, shape=(15000, 48))
    partial[:5000] = whole[:5000]
    del partial
    (tmp_path / "train.npy.tmp.json").write_text(json.dumps({"n": 15000, "rows": 5000}))
    r = subprocess.run([SAELENS_PYTHON, str(HERE / "synthbench.py"), "--mode=samples",
                        f"--model_dir={tiny_bench / 'model'}", "--samples=15000", f"--out={path}"],
                       capture_output=True, text=True, cwd=HERE)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("samples 10,000/15,000")  # it began at the second chunk
    assert np.array_equal(np.load(path), whole[:15000])
    assert not list(tmp_path.glob("*.tmp*"))


def test_synthbench_curve_points_are_checkpoints_of_the_one_run(tiny_bench, tmp_path):
    """--curve scores the run at 13,312 samples seen (13 steps), continues it from that checkpoint and scores it at the
    end: the end's SAE is the uninterrupted run's (tiny_bench's, no curve) to the bit, each point has its line in
    results.jsonl (a line lost to a stop comes back from its score when run again), and --mode=plot draws them."""
    args = [f"--config={tiny_bench / 'tiny.json'}", "--archs=batchtopk", "--samples=30000", "--d_sae=128", "--k=4",
            "--eval_samples=2000", f"--model_dir={tiny_bench / 'model'}", f"--data_dir={tiny_bench / 'data'}"]
    r = synthbench(*args, "--curve=13312", f"--out_dir={tmp_path}", env={"SAELENS_PYTHON": SAELENS_PYTHON})
    assert r.returncode == 0, r.stderr + r.stdout
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["run"], r["samples_seen"]) for r in lines] == [("gpt_sae-batchtopk-few_samples-30000", 13312),
                                                              ("gpt_sae-batchtopk-few_samples-30000", 26624)]
    curve = load_file(tmp_path / "gpt_sae-batchtopk-few_samples-30000" / "export" / "sae_weights.safetensors")
    whole = load_file(tiny_bench / "out" / "gpt_sae-batchtopk-few_samples-30000" / "export" / "sae_weights.safetensors")
    assert curve.keys() == whole.keys() and all(np.array_equal(curve[k], whole[k]) for k in whole)
    point = load_file(tmp_path / "gpt_sae-batchtopk-few_samples-30000" / "export-13312" / "sae_weights.safetensors")
    assert not np.array_equal(point["W_dec"], whole["W_dec"])  # an earlier SAE, not the end's again
    # a run stopped between a point's score and its line: run again, the line comes back from the score file as it was
    results, scored = tmp_path / "results.jsonl", tmp_path / "gpt_sae-batchtopk-few_samples-30000" / "score.json"
    text, scored_at = results.read_text(), scored.stat().st_mtime_ns
    results.write_text(text.splitlines(keepends=True)[0])
    r = synthbench(*args, "--curve=13312", f"--out_dir={tmp_path}", env={"SAELENS_PYTHON": SAELENS_PYTHON})
    assert r.returncode == 0, r.stderr + r.stdout
    assert results.read_text() == text and scored.stat().st_mtime_ns == scored_at  # not scored again
    r = synthbench("--mode=plot", f"--out_dir={tmp_path}", f"--out={tmp_path / 'curves.png'}")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
