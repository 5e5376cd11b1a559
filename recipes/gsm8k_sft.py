# Recipe, stage 2 of 6: SFT of an instruct checkpoint on GSM8K, half of each batch LCS traces of
# slips (research notes 4.2) and half traces of the model's own wrong train-split solutions
# (self_errors.py, stage 1). A config file for train_sft.py; --key=value flags after it override it:
#   python train_sft.py recipes/gsm8k_sft.py --init_from=$MODEL --tokenizer=$MODEL
# Sized for one 80 GB GPU and a 0.5B-1.5B model (Qwen2.5-0.5B-Instruct, Llama-3.2-1B-Instruct).
out_dir = "out/gsm8k/sft"
task = "gsm8k"
traces_file = "out/gsm8k/self_traces.jsonl"
traces_ratio = 0.5
augment = "lcs"            # the other half: a near-miss slip of the reference, aligned and undone
backtrack_ratio = 0.5
curriculum = "0:2,0.5:4"
policy = "rewind"
mask_errors = True
block_size = 1024
batch_size = 8
grad_accum = 4
max_iters = 400
lr = 1e-5
min_lr = 1e-6
warmup_iters = 20
weight_decay = 0.0
bk_init = "description"
eval_interval = 100
eval_n = 200
max_new_tokens = 400
log_interval = 5
save_interval = 100
device = "cuda"
dtype = "bfloat16"
