"""Special-token ids, fixed for every tokenizer amos-ds trains, so that models and shards agree without lookups."""

PAD_ID = 0
CLS_ID = 1
SEP_ID = 2
MASK_ID = 3
UNK_ID = 4

SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]")
NUM_SPECIAL_TOKENS = len(SPECIAL_TOKENS)

# Label value for positions that carry no MLM target (PyTorch's cross-entropy ignore_index).
IGNORE_INDEX = -100
