# Issue 12: context length. SAEs trained on 512-token contexts of SmolLM2-135M layer 15 mlp_in, to set beside the
# same settings trained on 128-token contexts (config/smollm2_l15_frontier.py's relu-l1_coeff2.0 and topk-k32),
# both scored by position bucket on 512-token val contexts. Before it, once (the 128-token cache's harvest dtype):
#   python sae.py --mode=cache --init_from=models/smollm2-135m --data_dir=data/smollm2 --layer=15 --site=mlp_in \
#       --block_size=512 --cache_dir=data/smollm2_l15_ctx512 --cache_tokens=262144 --eval_tokens=8192 --dtype=float32
# then python sae.py config/smollm2_l15_ctx512.py, and the 128-token SAEs on 512-token contexts:
#   python sae.py --eval_only=True --eval_block_size=512 --out_dir=out/smollm2_l15_frontier/relu-l1_coeff2.0
#   python sae.py --eval_only=True --eval_block_size=512 --out_dir=out/smollm2_l15_frontier/topk-k32
acts = "data/smollm2_l15_ctx512"
out_dir = "out/smollm2_l15_ctx512"
d_sae = 4608
batch_size = 1024
lr = 3e-3
max_iters = 600
arch = ["relu", "topk"]
l1_coeff = 2.0
k = 32
l1_warmup_iters = 200
eval_interval = 600
eval_tokens = 8192
resample_iters = ()
dead_window = 300_000
