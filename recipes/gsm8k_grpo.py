# Recipe, stage 5 of 6: GRPO from the second SFT round of stage 4 (research notes 6-7), rewards on
# the resolved completion, the process component from stage 4's verifier head (a frozen copy: the
# process reward model; "" would score the calculator checks instead). A config file for
# train_grpo.py; --key=value flags after it override it:
#   python train_grpo.py recipes/gsm8k_grpo.py
out_dir = "out/gsm8k/grpo"
init_from = "out/gsm8k/sft2"
prm = "out/gsm8k/sft2"
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
