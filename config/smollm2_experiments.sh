#!/usr/bin/env bash
# The experiments on SmolLM2-135M, end to end from a clean clone (docs/results.md), each part one
# command: bash config/smollm2_experiments.sh PART, PART one of data frontier jl lr jl_forms transcoders context finetune
# layers all_layers all_layers_table plot
# (or all, in that order). Every step's output goes to logs/<step>.log; a step whose log ends in "done" is skipped, so
# a rerun continues after the last finished step. About 6 hours on 2 CPU cores in all (docs/results.md gives each part's).
set -euo pipefail
cd "$(dirname "$0")/.."
export TIKTOKEN_CACHE_DIR="${TIKTOKEN_CACHE_DIR:-$HOME/.cache/gpt_sae/tiktoken}"
MODEL=models/smollm2-135m
step() {  # step NAME COMMAND...: runs the command once, its output in logs/NAME.log
  local name=$1; shift
  if [ -f "logs/$name.log" ] && [ "$(tail -n 1 "logs/$name.log")" = "done" ]; then return; fi
  echo "$(date -u +%FT%TZ) $name: $*"
  mkdir -p logs
  { time "$@"; } > "logs/$name.log" 2>&1 || { echo "$name failed: see logs/$name.log"; exit 1; }
  echo done >> "logs/$name.log"
  collect
}
collect() {  # every run's log.jsonl, config.json and overlap.json under out/ copied to logs/runs/ (committed; plot reads them)
  [ -d out ] || return 0  # a clean clone's first steps (data, caches) have no runs yet: find would fail the script
  find out -name log.jsonl 2>/dev/null | while read -r log; do
    dir=$(dirname "$log"); mkdir -p "logs/runs/${dir#out/}"
    cp "$log" "logs/runs/${dir#out/}/"
    for extra in config.json overlap.json; do
      if [ -f "$dir/$extra" ]; then cp "$dir/$extra" "logs/runs/${dir#out/}/"; fi
    done
  done
  find out -name replacement.jsonl 2>/dev/null | while read -r log; do  # a pass over layers: the replacement model's
    dir=$(dirname "$log"); mkdir -p "logs/runs/${dir#out/}"; cp "$log" "logs/runs/${dir#out/}/"
  done
}
cache() {  # cache MODEL LAYER DIR [BLOCK TOKENS [FLAGS...]]: an activation cache of mlp_in at LAYER (FLAGS: another
  # --site, a --target_site), harvested in fp32
  python sae.py --mode=cache --init_from="$1" --data_dir=data/smollm2 --layer="$2" --site=mlp_in --cache_dir="$3" \
    --block_size="${4:-128}" --cache_tokens="${5:-524288}" --eval_tokens=8192 --dtype=float32 "${@:6}"
}
data() {
  [ -f $MODEL/model.safetensors ] || python ../shared/tools/gguf_to_hf.py $MODEL
  step prepare_smollm2 python prepare.py --input='../shared/data/text/*.jsonl' --tokenizer=$MODEL --out_dir=data/smollm2
  step smollm2_l15_cache cache $MODEL 15 data/smollm2_l15
}
frontier() { step smollm2_l15_frontier python sae.py config/smollm2_l15_frontier.py; }
jl() { step smollm2_l15_jl python sae.py config/smollm2_l15_jl.py; }
lr() { step smollm2_l15_lr python sae.py config/smollm2_l15_lr.py; }
jl_forms() {  # the JL power and welch forms in hybrid, the baselines retrained, and each SAE's feature overlap
  for part in base power welch; do
    step smollm2_l15_jl_$part python sae.py config/smollm2_l15_jl_$part.py
    step smollm2_l15_jl_${part}_overlap python analyze.py --mode=overlap --out_dir=out/smollm2_l15_jl_$part
  done
}
transcoders() {  # transcoders (plain, skip) from mlp_in to mlp_out and SAEs on mlp_out beside them, at
  # layer 15 (and a fourth relu skip transcoder: its L1 sweep stayed under L0 32), the best linear map alone, the
  # features' top tokens (--mode=overlap) after 600 steps and of a skip transcoder and an SAE trained 4x longer; then
  # layer 5, topk and relu
  tc_layer 15
  step smollm2_l15_linear_mlp linear_mlp
  step smollm2_l15_tc_relu_skip python sae.py config/smollm2_l15_transcoders.py --arch=relu --skip=True \
    --l1_coeff=0.5 --out_dir=out/smollm2_l15_tc/relu-skipTrue-l1_coeff0.5
  step smollm2_l15_tc_long python sae.py config/smollm2_l15_tc_long.py
  step smollm2_l15_out_long python sae.py config/smollm2_l15_tc_long.py --acts=data/smollm2_l15_out \
    --site=mlp_out --target_site= --out_dir=out/smollm2_l15_out_long --skip=False
  for run in l15_tc l15_out l15_tc_long l15_out_long; do
    step smollm2_${run}_overlap python analyze.py --mode=overlap --out_dir=out/smollm2_$run
  done
  # the relu SAE on mlp_out stayed above L0 32 over L1 1-4: one coefficient more fills the matched-L0 row
  step smollm2_l15_out_relu8 python sae.py config/smollm2_l15_transcoders.py --acts=data/smollm2_l15_out \
    --site=mlp_out --target_site= --skip=False --arch=relu --l1_coeff=8.0 --out_dir=out/smollm2_l15_out/relu-l1_coeff8.0
  tc_layer 5 --arch=topk
  # layer 5's relu transcoders and SAEs, beside the topk ones (their own out_dirs: a sweep's directory is its own)
  step smollm2_l5_tc_relu python sae.py config/smollm2_l15_transcoders.py --acts=data/smollm2_l5_tc \
    --out_dir=out/smollm2_l5_tc_relu --arch=relu
  step smollm2_l5_out_relu python sae.py config/smollm2_l15_transcoders.py --acts=data/smollm2_l5_out \
    --site=mlp_out --target_site= --out_dir=out/smollm2_l5_out_relu --skip=False --arch=relu
  for c in 0.5 0.25; do  # layer 5's relu skip transcoders stayed under L0 15 over L1 1-4: two weaker ones reach 32
    step smollm2_l5_tc_relu_skip$c python sae.py config/smollm2_l15_transcoders.py --acts=data/smollm2_l5_tc \
      --arch=relu --skip=True --l1_coeff=$c --out_dir=out/smollm2_l5_tc_relu/skipTrue-l1_coeff$c
  done
}
tc_layer() {  # tc_layer L [FLAGS...]: both caches at layer L, config/smollm2_l15_transcoders.py's transcoders and SAEs
  local L=$1; shift
  step smollm2_l${L}_tc_cache cache $MODEL $L data/smollm2_l${L}_tc 128 524288 --target_site=mlp_out
  step smollm2_l${L}_out_cache cache $MODEL $L data/smollm2_l${L}_out 128 524288 --site=mlp_out
  step smollm2_l${L}_tc python sae.py config/smollm2_l15_transcoders.py --acts=data/smollm2_l${L}_tc \
    --out_dir=out/smollm2_l${L}_tc "$@"
  step smollm2_l${L}_out python sae.py config/smollm2_l15_transcoders.py --acts=data/smollm2_l${L}_out \
    --site=mlp_out --target_site= --out_dir=out/smollm2_l${L}_out --skip=False "$@"
}
linear_mlp() {  # the least-squares affine map from mlp_in to mlp_out on the layer-15 pair cache's train rows, scored
  # as a skip transcoder with no features (FVU on the cache's val rows; CE and KL with it spliced in)
  python - <<'PY'
import json, numpy as np, torch, sae
m = json.load(open("data/smollm2_l15_tc/manifest.json"))
rows = np.concatenate([np.load(f"data/smollm2_l15_tc/{f}") for f in m["train"]["files"]]).astype(np.float64)
d = m["d_in"]
X = np.hstack([rows[:, :d], np.ones((len(rows), 1))])  # (N, d + 1): the input and a bias column
W = np.linalg.solve(X.T @ X, X.T @ rows[:, d:])        # (d + 1, d_out)
linear = sae.SAE(d, 8, d_out=d, skip=True)
with torch.no_grad():
    linear.W_dec.zero_(), linear.b_enc.fill_(-1e4)     # no feature ever fires: the skip path alone
    linear.W_skip.copy_(torch.from_numpy(W[:d].T)), linear.b_dec.copy_(torch.from_numpy(W[d]))
cfg = sae.TrainConfig(init_from=m["model"], data_dir=m["data_dir"], layer=15, site="mlp_in", target_site="mlp_out",
                      block_size=128, eval_tokens=8192, d_sae=8)
batches = sae.val_contexts(cfg.data_dir, 128, 8192, "evaluation").split(cfg.harvest_batch)
(metrics,) = sae.evaluate([linear], [sae.FeatureTracker(8, 1000)], (1.0, 1.0), cfg, sae.load_lm(cfg), batches)
print({k: round(metrics[k], 4) for k in ("fvu", "ce_clean", "ce_sae", "ce_zero", "ce_recovered", "kl")})
PY
}
context() {  # 512-token SAEs, and the frontier's 128-token ones scored on 512-token contexts
  step smollm2_l15_ctx512_cache cache $MODEL 15 data/smollm2_l15_ctx512 512 262144
  step smollm2_l15_ctx512 python sae.py config/smollm2_l15_ctx512.py
  for run in smollm2_l15_frontier/relu-l1_coeff2.0 smollm2_l15_frontier/topk-k32 smollm2_l15_ctx512; do
    step "smollm2_eval512_${run//\//_}" python sae.py --eval_only=True --eval_block_size=512 --eval_tokens=32768 \
      --out_dir=out/$run  # 64 val contexts of 512 tokens, 4x the training runs' evaluation
  done
}
layer_saes() {  # layer_saes CACHE OUT: config/smollm2_layers.py's SAEs on one cache, and its hybrid
  python sae.py config/smollm2_layers.py --acts="$1" --out_dir="$2"
  python sae.py config/smollm2_layers.py --acts="$1" --out_dir="$2-hybrid" --arch=relu --loss=hybrid
}
layers() {
  for L in 15 0 5 10 20 25 29; do
    [ $L = 15 ] || step smollm2_l${L}_cache cache $MODEL $L data/smollm2_l$L
    step smollm2_layers_l$L layer_saes data/smollm2_l$L out/smollm2_layers/l$L
  done
}
finetune() {  # LoRA on FineWeb-Edu; the layer-15 SAEs on the fine-tune, against SAEs trained on it
  step prepare_smollm2_edu python prepare.py --input='../shared/data/text/fineweb_edu*.jsonl' --tokenizer=$MODEL \
    --out_dir=data/smollm2_edu
  step smollm2_lora_edu python analyze.py config/smollm2_lora_edu.py
  step smollm2_edu_l15_cache cache $MODEL-edu 15 data/smollm2_edu_l15
  step smollm2_edu_layers_l15 layer_saes data/smollm2_edu_l15 out/smollm2_edu/l15
  step smollm2_layers_l15 layer_saes data/smollm2_l15 out/smollm2_layers/l15  # the original's (also in layers)
  for run in out/smollm2_layers/l15 out/smollm2_layers/l15-hybrid; do
    step "smollm2_l15_on_edu_$(basename $run)" python analyze.py --mode=persistence --out_dir=$run --eval_model=$MODEL-edu
  done
}
all_layers() {  # transcoder sets (plain, skip) and a cross-layer transcoder on all 30 layers, each exported
  # to circuit-tracer and scored by it over attribution_graphs.py's dozen prompts (circuit-tracer's own venv:
  # CIRCUIT_TRACER_PYTHON, docs/research-helpers.md), the first prompt's graph drawn in figures/smollm2_all_layers
  step smollm2_all_layers python sae.py config/smollm2_all_layers.py
  step smollm2_all_layers_clt python sae.py config/smollm2_all_layers_clt.py
  for set in skipFalse skipTrue; do
    step smollm2_all_layers_export_$set python analyze.py --mode=export --export_format=circuit_tracer \
      --out_dir=out/smollm2_all_layers --export_set=$set --export_dir="$PWD/export/smollm2_all_layers-$set"
  done
  step smollm2_all_layers_export_clt python analyze.py --mode=export --export_format=circuit_tracer \
    --out_dir=out/smollm2_all_layers_clt --export_dir="$PWD/export/smollm2_all_layers-clt"
  step smollm2_all_layers_graphs "${CIRCUIT_TRACER_PYTHON:?set CIRCUIT_TRACER_PYTHON to the python of circuit-tracer}" \
    attribution_graphs.py $MODEL figures/smollm2_all_layers export/smollm2_all_layers-skipFalse \
    export/smollm2_all_layers-skipTrue export/smollm2_all_layers-clt
}
all_layers_table() {  # the all-layers table (docs/results.md) and its FVU-by-layer figure, from the copies in logs/runs and
  # figures/smollm2_all_layers/graph_scores.json: each kind's last evaluation
  python - <<'PY'
import json, statistics, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
R = "logs/runs"
last = lambda path: [json.loads(line) for line in open(path)][-1]
rows, fvus = {}, {}
replacement = {}
for line in open(f"{R}/smollm2_all_layers/replacement.jsonl"):
    r = json.loads(line)
    replacement[r["set"]] = r  # the last evaluation of each set
for name, label in (("skipFalse", "transcoders"), ("skipTrue", "skip transcoders")):
    evals = [last(f"{R}/smollm2_all_layers/layer{l:02d}-{name}/log.jsonl") for l in range(30)]
    fvus[label] = [e["fvu"] for e in evals]
    rows[label] = dict(replacement[name], set=name, iters=evals[0]["iter"], l0=statistics.mean(e["l0"] for e in evals),
                       alone_ce=statistics.mean(e["ce_sae"] - e["ce_clean"] for e in evals))
clt = last(f"{R}/smollm2_all_layers_clt/log.jsonl")
fvus["cross-layer transcoder"] = [clt["fvu_by_layer"][str(l)] for l in range(30)]
rows["cross-layer transcoder"] = dict(set="clt", iters=clt["iter"], l0=clt["l0"] / 30, alone_ce=float("nan"),
                                      ce_increase=clt["ce_sae"] - clt["ce_clean"], kl=clt["kl"],
                                      ce_recovered=clt["ce_recovered"])
scores = json.load(open("figures/smollm2_all_layers/graph_scores.json"))["exports"]
missing = {"replacement": float("nan"), "completeness": float("nan")}  # an export not scored (yet)
print("| kind | steps | L0 a layer | FVU mean | FVU median | FVU worst (layer) | one layer alone: CE increase (mean) | "
      "all 30 replaced: CE increase | KL | CE recovered | graph replacement | graph completeness |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for label, r in rows.items():
    fvu, s = fvus[label], scores.get(f"smollm2_all_layers-{r['set']}", missing)
    worst = max(range(30), key=lambda l: fvu[l])
    num = lambda v: "—" if v != v else f"{v:.3f}"  # NaN: not measured
    print(f"| {label} | {r['iters']} | {r['l0']:.1f} | {statistics.mean(fvu):.3f} | {statistics.median(fvu):.3f} | "
          f"{fvu[worst]:.3f} ({worst}) | {num(r['alone_ce'])} | {r['ce_increase']:.3f} | {r['kl']:.3f} | "
          f"{r['ce_recovered']:.3f} | {num(s['replacement'])} | {num(s['completeness'])} |")
fig, ax = plt.subplots(figsize=(7, 4))
for label, fvu in fvus.items():
    ax.plot(range(30), fvu, marker="o", ms=3, label=f"{label} ({rows[label]['iters']} steps)")
ax.set_xlabel("layer"), ax.set_ylabel("FVU of mlp_out (held out)"), ax.legend()
ax.set_title("SmolLM2-135M, all 30 layers: batchtopk k 16 a layer, 1,152 features a layer")
fig.tight_layout()
fig.savefig("figures/smollm2_all_layers/fvu_by_layer.png", dpi=120)
print("wrote figures/smollm2_all_layers/fvu_by_layer.png")
PY
}
plot() {  # from the copies in logs/runs: the figures and tables come back from the committed logs alone
  R=logs/runs
  python analyze.py --mode=plot --plot_runs=$R/smollm2_l15_frontier,$R/smollm2_l15_jl,$R/smollm2_l15_lr --plot_dir=figures/smollm2_l15
  python analyze.py --mode=plot --plot_runs="$R/smollm2_l15_frontier/relu-*,$R/smollm2_l15_frontier/topk-*,$R/smollm2_l15_jl/hybrid-*,$R/smollm2_l15_jl_base,$R/smollm2_l15_jl_power,$R/smollm2_l15_jl_welch" \
    --plot_dir=figures/smollm2_l15_jl_forms
  python analyze.py --mode=plot --plot_runs=$R/smollm2_l15_tc,$R/smollm2_l15_out --plot_dir=figures/smollm2_l15_transcoders
  python analyze.py --mode=plot --plot_runs=$R/smollm2_l5_tc,$R/smollm2_l5_out,$R/smollm2_l5_tc_relu,$R/smollm2_l5_out_relu \
    --plot_dir=figures/smollm2_l5_transcoders
  python analyze.py --mode=plot --plot_runs=$R/smollm2_layers --plot_dir=figures/smollm2_layers
  python analyze.py --mode=plot --plot_runs=$R/smollm2_l15_ctx512,$R/smollm2_l15_frontier/relu-l1_coeff2.0,$R/smollm2_l15_frontier/topk-k32 \
    --plot_dir=figures/smollm2_context
  python analyze.py --mode=plot --plot_runs=$R/smollm2_layers/l15,$R/smollm2_layers/l15-hybrid,$R/smollm2_edu \
    --plot_dir=figures/smollm2_finetune
}
case "${1:-all}" in
  all) data; frontier; jl; lr; jl_forms; transcoders; context; layers; finetune; all_layers; all_layers_table; plot ;;
  data|frontier|jl|lr|jl_forms|transcoders|context|layers|finetune|all_layers|all_layers_table|plot) "$1" ;;
  *) echo "usage: bash config/smollm2_experiments.sh [all|data|frontier|jl|lr|jl_forms|transcoders|context|layers|finetune|all_layers|all_layers_table|plot]"
     exit 1 ;;
esac
