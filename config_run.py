"""The one file to edit: what `python main.py` does. Command-line flags override it for one run
(`python main.py --help` lists them). Every value is checked before training starts."""

TASK = "pretrain"     # "pretrain" trains a model; "generate" writes text (needs --checkpoint DIR or --pretrained gpt2);
                      # "export" writes a run's model for Hugging Face transformers (--checkpoint DIR --out FOLDER)
DEVICE = None         # None picks the best available: "cuda", then "mps", then "cpu"

QUICK_MODE = True     # a small model, one epoch: done in well under a minute on a laptop CPU
CUSTOM_MODE = False   # train with custom_params below (set QUICK_MODE = False too)
# With both False: full mode, GPT-2 124M at context 256 for 10 epochs (the book's run).

MODEL = None          # None: the mode's model; or a preset such as "gpt-mini", "gpt2-small", "gpt2-medium"
TOKENIZER = "gpt2"    # "gpt2": GPT-2's BPE through tiktoken (50,257 tokens)
                      # "bpe": minigpt's own BPE with GPT-2's vocabulary (same ids; downloads 1.5 MB once)
                      # "char": one token per character of the text
                      # "train": learn a new BPE of BPE_VOCAB_SIZE tokens on the training split first
                      # or the path of a saved BPE, e.g. "runs/pretrain-quick/tokenizer.bpe"
BPE_VOCAB_SIZE = 1024 # size of the BPE that TOKENIZER = "train" learns (the model's vocab_size follows)
DATA = None           # None: the-verdict.txt (downloaded once); or the path of any UTF-8 text file
OUT = None            # None: runs/<task>-<mode> (a new -2, -3 ... directory if that one holds a run)

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
    "model_overrides": {       # changes to the model preset (gpt2-small unless MODEL says otherwise)
        "emb_dim": 768,
        "n_heads": 12,
        "n_layers": 12,
        "drop_rate": 0.1,
        "qkv_bias": False,
        "context_length": 256,
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
