"""Vocabulary and prompts of the embedded model: class prompt, reserved trigger tokens, tokenizer.

The embedded base model has a word-level tokenizer built by the project (``tokenizers`` WordLevel
wrapped in ``transformers.PreTrainedTokenizerFast``, so ``StableDiffusionPipeline`` drives it like
CLIP's). Its vocabulary holds:
- the words of the pre-training captions (the class prompt and a few variants);
- ``N_TRIGGERS`` reserved pseudo-words that pre-training never uses: a DreamBooth fine-tune binds the
  subject to a fresh random one of them ("a photo of <trigger> face"), as the paper binds it to a
  rare 4-11 letter word;
- a few class words for the items path (dog, toy, ...), also unused by pre-training;
- ``APPEARANCE_WORDS`` (appended last, so the ids above never move): two sets of ``N_APPEARANCE``
  made-up words naming clusters of face descriptors (two k-means on separate principal subspaces
  of dlib descriptors, :func:`core.model.train_base.appearance_labels`). Pre-training captions
  "a photo of <a> <b> face" carry them, so the base model learns to *listen to its prompt*: with
  near-constant captions the UNet ignored the text, and a trigger word could bind nothing.
The empty prompt is the unconditional prompt of classifier-free guidance.
"""

from __future__ import annotations

import random

CLASS_PROMPT = "a photo of a face"
INSTANCE_TEMPLATE = "a photo of {trigger} face"
PRETRAIN_CAPTIONS = (
    CLASS_PROMPT,
    "a face",
    "a photo of a person",
    "a portrait of a person",
    "a close up photo of a face",
)
ITEM_WORDS = ("object", "item", "dog", "cat", "toy", "bag", "bowl", "can", "candle", "clock", "shoe", "glasses")
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
N_TRIGGERS = 512
N_APPEARANCE = 32
APPEARANCE_WORDS = tuple(f"ida{i:02d}" for i in range(N_APPEARANCE)) + tuple(f"idb{i:02d}" for i in range(N_APPEARANCE))
APPEARANCE_TEMPLATE = "a photo of {words} face"
MAX_LENGTH = 16

_CONSONANTS = "bdfgklmnprstvxz"
_VOWELS = "aeiou"


def trigger_words(n: int = N_TRIGGERS, seed: int = 1234) -> list[str]:
    """The reserved trigger pseudo-words (deterministic, 4-7 letters, never English words we use)."""
    rng = random.Random(seed)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n:
        syll = rng.randint(2, 3)
        w = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syll))
        if rng.random() < 0.5:
            w += rng.choice(_CONSONANTS)
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def vocabulary() -> list[str]:
    """Ordered token list: specials, caption words, item words, reserved triggers."""
    words: list[str] = list(SPECIALS)
    for cap in PRETRAIN_CAPTIONS:
        for w in cap.split():
            if w not in words:
                words.append(w)
    words += [w for w in ITEM_WORDS if w not in words]
    words += [w for w in trigger_words() if w not in words]
    words += [w for w in APPEARANCE_WORDS if w not in words]
    return words


def build_tokenizer():
    """A word-level fast tokenizer with BOS/EOS like CLIP's, padded to ``MAX_LENGTH``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MAX_LENGTH,
    )


def appearance_caption(*words: str) -> str:
    """A pre-training caption naming appearance clusters ("a photo of ida03 idb17 face")."""
    return APPEARANCE_TEMPLATE.format(words=" ".join(words))


def random_trigger(rng: random.Random | None = None) -> str:
    """A fresh trigger word drawn from the reserved set."""
    return (rng or random.Random()).choice(trigger_words())


def instance_prompt(trigger: str) -> str:
    return INSTANCE_TEMPLATE.format(trigger=trigger)
