# SmolLM2-135M, layer 15 of its 30 blocks (the middle), mlp_in, trained from the activation cache: the README's
# offline walk-through (section "real models"). Before it, once:
#   python ../shared/tools/gguf_to_hf.py models/smollm2-135m
#   python prepare.py --input='../shared/data/text/*.jsonl' --tokenizer=models/smollm2-135m --out_dir=data/smollm2
#   python sae.py --mode=cache --init_from=models/smollm2-135m --data_dir=data/smollm2 --layer=15 --site=mlp_in \
#       --cache_dir=data/smollm2_l15 --cache_tokens=524288 --eval_tokens=8192
acts = "data/smollm2_l15"   # the model, layer, site and token shards come from the cache's manifest
out_dir = "out/smollm2_l15"
d_sae = 4608                # 8 x 576
lr = 3e-3
l1_coeff = 3.0
sparsity_warmup_iters = 200
max_iters = 2000
eval_interval = 500
eval_tokens = 8192          # val contexts for FVU, CE and KL: each costs three forwards of the model here
resample_iters = (500, 1000)
dead_window = 1_000_000
dtype = "float32"           # its README results were measured in fp32, before --dtype=auto chose bf16 on bf16 CPUs
