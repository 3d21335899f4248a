"""The one file to edit: what `python main.py` does. Command-line flags override it for one run
(`python main.py --help` lists them). Every value is checked before training starts."""

TASK = "pretrain"     # "pretrain" trains a model; "generate" writes text (needs --checkpoint DIR or --pretrained gpt2);
                      # "export" writes a run's model for Hugging Face transformers (--checkpoint DIR --out FOLDER);
                      # "classify" fine-tunes a classifier (SMS spam, or DATA = a .csv/.tsv/.jsonl of text,label);
                      # "sft" fine-tunes a model to follow instructions (instruction-data.json, or DATA = your JSON)
                      # alignment (chapter 8): "reward" trains a reward model on preference pairs; "dpo" tunes a
                      # model on them directly; "ppo" and "grpo" tune it by sampling answers and rewarding them;
                      # "studio" opens the web page that builds, trains and chats (python main.py --task studio)
DEVICE = None         # None picks the best available: "cuda", then "mps", then "cpu"

QUICK_MODE = True     # a small model, one epoch: done in well under a minute on a laptop CPU
CUSTOM_MODE = False   # train with custom_params below (set QUICK_MODE = False too)
# With both False: full mode, GPT-2 124M at context 256 for 10 epochs (the book's run).

MODEL = None          # None: the mode's model; or a preset such as "gpt-mini", "gpt2-small", "gpt2-medium",
                      # or Llama-style "llama-tiny", "moe-tiny", "llama-124m" (chapter 10)
TOKENIZER = "gpt2"    # "gpt2": GPT-2's BPE through tiktoken (50,257 tokens; its files ship with minigpt)
                      # "bpe": minigpt's own BPE with GPT-2's vocabulary (same ids, same shipped files)
                      # "char": one token per character of the text
                      # "train": learn a new BPE of BPE_VOCAB_SIZE tokens on the training split first
                      # or the path of a saved BPE, e.g. "runs/pretrain-quick/tokenizer.bpe"
BPE_VOCAB_SIZE = 1024 # size of the BPE that TOKENIZER = "train" learns (the model's vocab_size follows)
DATA = None           # None: the-verdict.txt (in the repository); "tinyshakespeare" (1.1 MB, downloaded once);
                      # "wikitext-2", "wikitext-103", "ptb" (downloaded once, with their own validation splits);
                      # the path of any UTF-8 text file; a .jsonl / .json of {"text": ...} records (TEXT_FIELD);
                      # pre-tokenized .jsonl, {"input_ids": [...]} per line, with its vocab.json beside it;
                      # "hf:NAME[:CONFIG]", a Hugging Face dataset (pip install datasets);
                      # or a folder of .txt files (big corpora are tokenized once into token files on disk
                      # and read through a memory map)
DATA_FORMAT = "auto"  # how DATA is read: "auto" (by what it is), "text", "json", "tokens" or "hf"
TEXT_FIELD = "text"   # the field of a JSON record, or the column of a dataset, that holds the text
OUT = None            # None: runs/<task>-<mode> (a new -2, -3 ... directory if that one holds a run or
                      # another run is training there: a run's folder is its own, under a lock)
EXPORT_HF = False     # True: after training, also hf/final and hf/best in the run directory, folders that
                      # Hugging Face transformers loads whole (model and tokenizer; --export-hf)

INIT = None           # where classify / sft / reward / dpo / ppo / grpo start: None = the mode's choice (quick: new weights; full: GPT-2,
                      # downloaded once); "scratch"; a published model: "gpt2", "gpt2-medium", ..., "smollm2-135m",
                      # "qwen2.5-0.5b" (python main.py --help lists them); a Hugging Face model folder; or a run
                      # directory, e.g. "runs/pretrain-full" (--checkpoint DIR / --pretrained NAME override it)

SEED = 123            # fixes the initial weights, the data order and sampling: same seed, same losses
LOG_EVERY = 10        # print a line with the recent loss and speed every this many steps

# Used when CUSTOM_MODE is True. Unset keys take full mode's values.
custom_params = {
    "num_epochs": 10,
    "batch_size": 2,
    "learning_rate": 4e-4,
    "weight_decay": 0.1,
    "eval_freq": 5,            # evaluate every this many optimizer steps
    "eval_iter": 5,            # batches per loss estimate
    "max_length": 256,         # tokens per training window (at most context_length)
    "stride": 256,             # step between windows; = max_length means no overlap
    "start_context": "Every effort moves you",  # prompt for the sample printed after each epoch
    "num_workers": 0,          # DataLoader worker processes
    "lr_schedule": "constant", # or "cosine": decay from learning_rate to min_lr after the warm-up
    "warmup_steps": 0,         # linear learning-rate warm-up
    "min_lr": None,            # where the cosine ends (None: learning_rate / 10)
    "grad_clip": None,         # clip the gradient norm to this, e.g. 1.0
    "beta2": 0.999,            # AdamW's second-moment decay (0.95-0.99 for bigger batches and models)
    # Training at scale (chapter 9). None of these changes what a step computes, only how:
    "micro_batch_size": None,  # windows per forward/backward per process; batch_size / it = gradient
                               # accumulation steps (None: batch_size split across processes; "auto":
                               # the largest that fits the device, found by trying, as --batch-size auto)
    "precision": "auto",       # "auto": bf16 on CUDA GPUs that have it, fp32 on CPU; or "fp32", "bf16", "fp16"
    "compile": False,          # torch.compile the model: fused kernels, after a wait while it compiles
    "sampling": "auto",        # "sliding" windows once per epoch, "random" windows; auto: random for token files
    "val_fraction": 0.1,       # the share at the end of the text held out for validation
    "model_overrides": {       # changes to the model preset (gpt2-small unless MODEL says otherwise)
        "emb_dim": 768,
        "n_heads": 12,
        "n_layers": 12,
        "drop_rate": 0.1,
        "qkv_bias": False,
        "bias": True,           # biases in the other linear layers and LayerNorm shifts (nanoGPT drops them)
        "context_length": 256,
        "tie_weights": False,   # the output head shares the token embedding (GPT-2 did)
        "activation": "gelu_tanh",  # GPT-2's GELU; "gelu" is the exact one (nanoGPT, faster on CPUs)
        # Modern switches (chapter 10); the presets "llama-tiny" / "moe-tiny" set them for you:
        "norm": "layernorm",    # or "rmsnorm"
        "pos_emb": "learned",   # or "sinusoidal", or "rope" (rotary; "rope_base": 10000.0)
        "ffn": "gelu",          # or "swiglu", or "moe" ("n_experts", "moe_top_k", "moe_aux_coef", ...)
        "n_kv_heads": None,     # fewer key/value heads than n_heads: grouped-query attention
    },
}

# Used by TASK = "generate" (python main.py --task generate --checkpoint DIR | --pretrained gpt2).
generation_params = {
    "max_new_tokens": 60,
    "temperature": 0.8,         # 0 = greedy: always the most likely token
    "top_k": 40,                # sample among the 40 most likely tokens (None: all)
    "top_p": None,              # or among the smallest set holding this probability, e.g. 0.9
    "repetition_penalty": 1.0,  # > 1 makes tokens already in the text less likely, e.g. 1.2
    "num_beams": 1,             # > 1: beam search, the most probable text (needs temperature 0)
    "length_penalty": 1.0,      # beam search: 0 ranks by total probability, higher favours longer texts
    "stop_strings": [],         # stop when one of these appears, e.g. ["\n\n"]
    "use_cache": True,          # the KV cache: the same text, many times faster
}

# Used by TASK = "classify" and "sft" in custom mode (flags such as --trainable override any mode).
finetune_params = {
    "trainable": "last_blocks",  # "all", "last_blocks" (+ final norm + head), "head", or "lora" (adapters + head)
    "last_blocks": 1,            # with "last_blocks": how many of the last transformer blocks train
    "lora_rank": 8,              # LoRA: W x + (alpha / rank) B A x, with B (out x rank) and A (rank x in)
    "lora_alpha": 16.0,
    "lora_dropout": 0.0,
    "lora_targets": ["qkv", "out_proj", "ff"],  # Linear layers that get adapters; also "out_head"
    "balance": True,             # classify: as many examples of every class as the rarest has
    "prompt_style": "alpaca",    # sft: "alpaca" (### Instruction: ...) or "chat" (<|user|> ... <|assistant|>)
    "mask_prompt": False,        # sft: the loss on the responses only
    "max_new_tokens": 256,       # sft: longest answer generated for each test instruction
    "judge": True,               # sft: also score the answers with a local Ollama judge, when one answers
    "judge_url": "http://localhost:11434",
    "judge_model": "llama3",
}

# Used by TASK = "reward", "dpo", "ppo" and "grpo" in custom mode (flags such as --beta override any mode).
align_params = {
    "prompt_style": "alpaca",   # the template of the answers: match the instruction-tuned run you start from
    "beta": 0.1,                # dpo: the implicit reward's scale; ppo/grpo: weight of the KL to the reference
    "dpo_loss": "sigmoid",      # dpo: "sigmoid" (Bradley-Terry) or "ipo" (a fixed target margin)
    "label_smoothing": 0.0,     # dpo: the share of preference labels assumed wrong (conservative DPO)
    "reward_model": None,       # ppo: a --task reward run; None rewards answers equal to the records' outputs
    "iterations": 100,          # ppo/grpo: rounds of sampling and updating
    "prompts_per_iteration": 16,
    "group_size": 8,            # grpo: answers per prompt; each is judged against its group's mean
    "update_epochs": 1,         # ppo/grpo: passes over each round's answers
    "minibatch_size": 64,
    "clip": 0.2,                # the ratio pi / pi_old is clipped to [1 - clip, 1 + clip]
    "kl_estimator": "k1",       # ppo: "k1" (log ratio) or "k3" (never negative, lower variance)
    "max_new_tokens": 8,        # ppo/grpo: the longest answer sampled
    "sft_steps": 1000,          # ppo/grpo from new weights: supervised warm-up steps on the task first
    "max_operand": 19,          # ppo/grpo without DATA: sums a + b with a, b up to this
}
