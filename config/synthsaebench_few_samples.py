# The k-sparse recipe for few samples (issue 34; measured on SynthSAEBench-16k, docs/results.md "Known features"):
# lr 3e-3 (3x the first recipe's 1e-3, 10x the published runs' 3e-4) with k annealed linearly from 4k to k over the
# first 240 steps (~250k samples at batch 1,024: the dense start leaves ~100 of 4,096 latents dead where lr 3e-3
# alone left 540-740), constant after. topk at 491k samples seen: EV 0.673, MCC 0.436, F1 0.356 where lr 1e-3 gave
# 0.601 / 0.292 / 0.172; at 2M: 0.722 / 0.632 / 0.621. For a fixed budget of 2M samples or more, also decay the rate
# to 0 over the second half (--decay=linear --decay_frac=0.5: 0.770 / 0.684 / 0.652 at 4.9M, against 0.725 / 0.654 /
# 0.626 constant); synthbench.py's default keeps it constant so that --curve's points are one run's. On your own
# activations:  python sae.py config/synthsaebench_few_samples.py --arch=topk --k=25 --acts=ACTS.npy --batch_size=1024
lr = 3e-3
k_anneal_iters = 240
k_anneal_start = 4.0
l1_warmup_iters = 100  # relu, jumprelu: the sparsity coefficient's ramp, a fifth of a 500k-sample run
