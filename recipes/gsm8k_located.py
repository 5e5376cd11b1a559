# Recipe, stage 4 of 6: a second SFT round from the stage-2 checkpoint, on the SFT model's own wrong
# solutions with their first wrong step located by rollouts (stage 3, self_errors.py
# --locate=rollouts), beside the stage-1 traces, and with a verifier head (its process labels are
# those located errors). The head is stage 5's process reward model. A config file for
# train_sft.py; --key=value flags after it override it:
#   cat out/gsm8k/self_traces.jsonl out/gsm8k/located_traces.jsonl > out/gsm8k/round2_traces.jsonl
#   python train_sft.py recipes/gsm8k_located.py
out_dir = "out/gsm8k/sft2"
init_from = "out/gsm8k/sft"
tokenizer = "out/gsm8k/sft"  # a checkpoint folder holds its tokenizer's files
task = "gsm8k"
traces_file = "out/gsm8k/round2_traces.jsonl"
traces_ratio = 0.5
augment = "lcs"
backtrack_ratio = 0.5
curriculum = "0:4"
policy = "rewind"
mask_errors = True
verifier_weight = 1.0
block_size = 1024
batch_size = 8
grad_accum = 4
max_iters = 200
lr = 5e-6
min_lr = 5e-7
warmup_iters = 10
weight_decay = 0.0
eval_interval = 100
eval_n = 200
max_new_tokens = 400
log_interval = 5
save_interval = 100
device = "cuda"
dtype = "bfloat16"
