# Context length. SAEs trained on 512-token contexts of SmolLM2-135M layer 15 mlp_in, to set beside the
# same settings trained on 128-token contexts (config/smollm2_l15_frontier.py's relu-l1_coeff2.0 and topk-k32),
# all four scored by position bucket on 64 val contexts of 512 tokens. The whole part, cache and evaluations
# included: bash config/smollm2_experiments.sh context
acts = "data/smollm2_l15_ctx512"
out_dir = "out/smollm2_l15_ctx512"
d_sae = 4608
batch_size = 1024
lr = 3e-3
max_iters = 600
arch = ["relu", "topk"]
l1_coeff = 2.0
k = 32
sparsity_warmup_iters = 200
eval_interval = 600
eval_tokens = 8192
resample_iters = ()
dead_window = 300_000
