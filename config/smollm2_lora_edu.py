# The fine-tuning persistence experiment's fine-tune. LoRA (rank 8 on every linear layer of the 30 blocks)
# on FineWeb-Edu alone, one pass over its train split; its val split holds the first 8,192 tokens of the same text
# that every SAE here is evaluated on, so those are held out from the fine-tune. Before it, once:
#   python prepare.py --input='../shared/data/text/fineweb_edu*.jsonl' --tokenizer=models/smollm2-135m \
#       --out_dir=data/smollm2_edu
# then python analyze.py config/smollm2_lora_edu.py (writes models/smollm2-135m-edu, a save_pretrained directory).
# The whole experiment, this included: bash config/smollm2_experiments.sh finetune
mode = "finetune"
init_from = "models/smollm2-135m"
data_dir = "data/smollm2_edu"
finetune_dir = "models/smollm2-135m-edu"
block_size = 256
harvest_batch = 8                  # 2,048 tokens a step
finetune_iters = 100               # 204,800 tokens: about one pass over the train split
finetune_lr = 1e-3
lora_rank = 8
lora_alpha = 16.0
eval_interval = 25
eval_tokens = 16384                # 64 val contexts of 256 tokens
log_interval = 5
