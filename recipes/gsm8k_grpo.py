# Recipe, stage 3 of 4: GRPO from the SFT checkpoint of stage 2 (research notes 6-7), rewards on the
# resolved completion. A config file for train_grpo.py; --key=value flags after it override it:
#   python train_grpo.py recipes/gsm8k_grpo.py
out_dir = "out/gsm8k/grpo"
init_from = "out/gsm8k/sft"
prompts_per_step = 32
group_size = 8
temperature = 1.0
max_new_tokens = 400
max_backtracks = 16
reward_weights = "notes"
loss_type = "dr_grpo"
scale_rewards = "none"
micro_batch = 16
max_iters = 200
lr = 1e-6
min_lr = 1e-6
warmup_iters = 10
eval_interval = 50
eval_n = 200
save_interval = 50
device = "cuda"
