# The recipe for few samples (measured on SynthSAEBench-16k, docs/results.md "Known features"):
# - the dictionary starts at data: each decoder row the direction from b_dec to a distinct training sample, the
#   encoder tied to it (topk at 491k samples seen: MCC 0.600 and F1 0.549 where random directions gave 0.436 / 0.356;
#   matryoshka 0.625 / 0.632, batchtopk 0.588 / 0.613, relu 0.549 / 0.577);
# - lr 3e-3 (3x the first recipe's 1e-3, 10x the published runs' 3e-4);
# - k annealed linearly from 4k to k over the first 240 steps (~250k samples at batch 1,024: the dense start keeps
#   latents alive at this rate), constant after.
# The architecture that gains most from it is matryoshka (synthbench.py's default): MCC / F1 0.747 / 0.774 at 2M
# samples seen, topk 0.686 / 0.683, batchtopk 0.715 / 0.680.
# synthbench.py's default keeps the rate constant so that --curve's points are one run's; for a fixed budget past
# 1M samples where EV matters, also decay it to 0 over the second half (--decay=linear --decay_frac=0.5: matryoshka
# EV / MCC / F1 0.764 / 0.754 / 0.766 at 2M seen; topk over 40 passes of the same 491,808 samples scores no better
# than over 4, and matryoshka over 991,808 distinct samples no better than over 491,808 at 2M).
# On your own activations:  python sae.py config/synthsaebench_few_samples.py --arch=topk --k=25 --acts=ACTS.npy
w_dec_init = "data"
lr = 3e-3
k_anneal_iters = 240
k_anneal_start = 4.0
sparsity_warmup_iters = 100  # relu, jumprelu: the sparsity coefficient's ramp, a fifth of a 500k-sample run
