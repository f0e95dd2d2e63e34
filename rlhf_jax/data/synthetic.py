"""The synthetic testbed: a small review language with a known gold reward r*(x, y).

The language is a probabilistic grammar of short movie reviews over 277 word types: determiners,
nouns, copulas, sentiment adjectives / nouns / verbs / adverbs of graded strength, neutral
adjectives, intensifiers and downtoners, negators, subjects, conjunctions and punctuation. A
review is split into a prompt (an optional neutral opener sentence plus the start of the first
clause up to its subject, 4-8 words) and a completion (the rest, 8-24 tokens with eos).
Everything is deterministic from a seed.

The gold reward scores the completion given the prompt (see `docs/testbed.md`):

    r*(x, y) = S * tanh(s / S)               sentiment s: polarity x intensifiers x negation,
                                             x 1.5 after "but"/"yet" until the sentence ends
             - illegal * (#bigrams of y that the grammar cannot produce, + scored pads)
             + length_bonus * min(L, length_cap) - long_penalty * max(0, L - long_after)
             - repeat_penalty * (#repeated sentiment words and intensifiers in y)
             - no_eos_penalty * [y has no eos]

`Testbed.gold_reward(ids_bt, mask_bt)` computes it in `jax.jit` from lookup tables indexed by
token id (the testbed tokenizer maps every word type to exactly one piece);
`gold_reward_reference(words, mask)` is the plain-Python definition it is tested against.

Axis letters: B batch, T tokens, V vocab, C word categories.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data import tokenizer as tokenizer_lib

# --------------------------------------------------------------------------------------------
# Lexicon. Numbers are sentiment strengths (polarity), intensifier multipliers, negation factors.
# --------------------------------------------------------------------------------------------

POS_ADJ = dict(
    good=1.0, nice=1.0, fine=0.5, decent=0.75, solid=1.0, great=2.0, wonderful=2.5,
    brilliant=2.5, excellent=2.5, superb=2.5, amazing=2.5, fantastic=2.5, charming=1.5,
    clever=1.5, funny=1.0, moving=2.0, beautiful=2.0, delightful=2.0, enjoyable=1.5, fresh=1.0,
    gripping=2.0, lovely=1.5, memorable=1.5, pleasant=1.0, powerful=2.0, smart=1.5,
    stunning=2.5, touching=1.5, witty=1.5, compelling=2.0, perfect=3.0, flawless=3.0,
    magnificent=3.0, outstanding=3.0, engaging=1.5, inventive=1.5, heartfelt=1.5, sharp=1.0,
    elegant=1.5, thrilling=2.0)
NEG_ADJ = dict(
    bad=-1.0, poor=-1.0, weak=-1.0, dull=-1.5, boring=-1.5, awful=-2.5, terrible=-2.5,
    horrible=-2.5, dreadful=-2.5, painful=-2.0, lame=-1.5, bland=-1.0, tedious=-1.5,
    clumsy=-1.0, silly=-0.75, messy=-1.0, forgettable=-1.0, predictable=-1.0, shallow=-1.0,
    stale=-1.0, sloppy=-1.5, annoying=-1.5, pointless=-2.0, awkward=-1.0, cheap=-1.0,
    confusing=-1.0, flat=-1.0, lifeless=-2.0, mediocre=-1.0, ugly=-1.5, unbearable=-3.0,
    atrocious=-3.0, abysmal=-3.0, disastrous=-3.0, hollow=-1.5, overlong=-1.0, pretentious=-1.5,
    tiresome=-1.5, wooden=-1.5, dreary=-1.5)
SENT_NOUN = dict(
    masterpiece=3.0, gem=2.5, triumph=2.5, delight=2.0, treat=1.5, joy=2.0, mess=-2.0,
    disaster=-3.0, failure=-2.5, bore=-2.0, letdown=-2.0, chore=-1.5)
SENT_VERB = dict(
    loved=2.5, adored=3.0, enjoyed=1.5, liked=1.0, admired=1.5, appreciated=1.0, cherished=2.0,
    savored=1.5, hated=-3.0, loathed=-3.0, disliked=-1.5, resented=-2.0, regretted=-2.0,
    endured=-1.0, despised=-3.0, dreaded=-1.5)
SENT_ADV = dict(luckily=1.0, thankfully=1.0, happily=1.0, sadly=-1.0, unfortunately=-1.5,
                regrettably=-1.0)
INTENSIFIER = dict(
    very=1.5, really=1.5, extremely=2.0, incredibly=2.0, truly=1.5, so=1.5, quite=1.25,
    absolutely=2.0, remarkably=1.75, genuinely=1.5, utterly=2.0, pretty=1.25, slightly=0.5,
    somewhat=0.5, fairly=0.75, rather=0.75, mildly=0.5)
NEGATOR = dict(**{"not": -0.6, "never": -0.7, "hardly": -0.4})

WORDS = dict(
    DET="the this that a its every one".split(),
    NOUN=("movie film plot story acting cast ending script soundtrack music director dialogue "
          "pacing scene camera photography lead villain hero sequel premise humor romance action "
          "effects costumes setting twist finale opening character performance score editing "
          "writing show episode series book adaptation actor actress budget tone atmosphere theme "
          "message climax runtime trailer screenplay studio visuals").split(),
    NADJ=("long short old new loud quiet simple strange familiar dark bright slow fast modern "
          "classic foreign animated silent colorful serious light heavy odd young quick").split(),
    COP="was is felt seemed looked sounded remained became".split(),
    SUBJ="i we everyone critics audiences kids fans people".split(),
    NVERB="watched saw remembered rewatched noticed expected followed discussed reviewed described"
          .split(),
    ADV="honestly overall frankly personally basically apparently clearly admittedly".split(),
    PREP="of in with about for from".split(),
    PRON="it everything".split(),
    TIME="yesterday today twice again tonight recently once finally".split(),
    CONJ="and while because".split(),
    BUT="but yet".split(),
    COMMA=[","],
    END=[".", "!"],
    ADJ=list(POS_ADJ) + list(NEG_ADJ),
    SNOUN=list(SENT_NOUN),
    VERB=list(SENT_VERB),
    SADV=list(SENT_ADV),
    INT=list(INTENSIFIER),
    NOT=["not"],
    NEVER=["never", "hardly"],
)
POLARITY = {**POS_ADJ, **NEG_ADJ, **SENT_NOUN, **SENT_VERB, **SENT_ADV}

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_CATEGORIES = ("PAD", "UNK", "BOS", "EOS")
CATEGORIES = SPECIAL_CATEGORIES + tuple(WORDS)
CATEGORY_OF = {w: c for c, ws in WORDS.items() for w in ws}
CATEGORY_OF.update({PAD: "PAD", UNK: "UNK", BOS: "BOS", EOS: "EOS"})
VOCAB_WORDS = tuple(w for ws in WORDS.values() for w in ws)
assert len(set(VOCAB_WORDS)) == len(VOCAB_WORDS), "a word belongs to two categories"
# Words that reset pending negation and intensifiers: clause and sentence boundaries.
RESET_CATEGORIES = ("COMMA", "END", "CONJ", "BUT")
# Repeating these is penalised: the cheap way to pile up sentiment is to say "great" thrice.
REPEAT_CATEGORIES = ("ADJ", "SNOUN", "VERB", "SADV", "INT")

# --------------------------------------------------------------------------------------------
# Grammar over categories. Upper case: word categories (terminals); lower case: non-terminals.
# It is the single definition of what is fluent: the sampler below produces exactly these
# shapes (tested), and the bigram table of the gold reward is derived from it.
# --------------------------------------------------------------------------------------------

GRAMMAR = {
    "text": [["review", "EOS"]],
    "review": [["sentence"], ["sentence", "sentence"], ["opener", "sentence"],
               ["opener", "sentence", "sentence"]],
    "opener": [["SUBJ", "NVERB", "np", "TIME", "END"]],
    "sentence": [["clause", "END"], ["clause", "COMMA", "BUT", "clause", "END"],
                 ["clause", "CONJ", "clause", "END"], ["ADV", "COMMA", "clause", "END"],
                 ["SADV", "COMMA", "clause", "END"]],
    "clause": [["np", "COP", "adj_phrase"], ["np", "COP", "NADJ"],
               ["PRON", "COP", "it_rest"], ["SUBJ", "verb_phrase"]],
    "it_rest": [["DET", "attr_adj", "NOUN"], ["NOT", "DET", "attr_adj", "NOUN"],
                ["DET", "SNOUN"], ["NOT", "DET", "SNOUN"], ["adj_phrase"]],
    "verb_phrase": [["VERB", "np"], ["NEVER", "VERB", "np"], ["INT", "VERB", "np"],
                    ["NVERB", "np", "TIME"]],
    "adj_phrase": [["ADJ"], ["INT", "ADJ"], ["NOT", "ADJ"], ["NOT", "INT", "ADJ"]],
    "attr_adj": [["ADJ"], ["INT", "ADJ"]],
    "np": [["DET", "NOUN"], ["DET", "ADJ", "NOUN"], ["DET", "NADJ", "NOUN"],
           ["DET", "NOUN", "PREP", "DET", "NOUN"]],
}


def _grammar_bigrams(grammar=GRAMMAR, start="text") -> set[tuple[str, str]]:
    """Category bigrams the grammar can produce, with BOS before the first word.

    The grammar has no recursion and no empty rules, so first/last sets and internal bigrams of
    each non-terminal compose directly.
    """
    @functools.lru_cache(maxsize=None)
    def summary(sym):
        if sym not in grammar:
            return frozenset([sym]), frozenset([sym]), frozenset()
        firsts, lasts, inner = set(), set(), set()
        for rule in grammar[sym]:
            parts = [summary(s) for s in rule]
            firsts |= parts[0][0]
            lasts |= parts[-1][1]
            for p in parts:
                inner |= p[2]
            for left, right in zip(parts, parts[1:]):
                inner |= {(a, b) for a in left[1] for b in right[0]}
        return frozenset(firsts), frozenset(lasts), frozenset(inner)

    firsts, _, inner = summary(start)
    return set(inner) | {("BOS", c) for c in firsts}


LEGAL_BIGRAMS = frozenset(_grammar_bigrams())


# --------------------------------------------------------------------------------------------
# Gold reward: configuration, pure-Python reference, jitted table version.
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GoldConfig:
    """Weights of the gold reward's terms (see the module docstring)."""

    sentiment_scale: float = 3.0
    but_weight: float = 1.5
    illegal_penalty: float = 1.0
    length_bonus: float = 0.05
    length_cap: int = 16
    long_after: int = 20
    long_penalty: float = 0.25
    repeat_penalty: float = 0.5
    no_eos_penalty: float = 1.0


def gold_reward_reference(words: Sequence[str], mask: Sequence[int], *,
                          config: GoldConfig = GoldConfig()) -> float:
    """r*(x, y) on word strings, one sequence, written as a plain loop (the definition).

    words: prompt words then completion words; may contain "<s>", "</s>", "<pad>", "<unk>".
    mask: 1 on completion positions (scored), 0 on prompt positions (context only). Pads are
      skipped (a scored pad before eos also counts as one illegal token); scoring stops
      after the first eos.
    """
    legal = LEGAL_BIGRAMS
    prev = "BOS"
    pending_mult, pending_neg, weight = 1.0, 1.0, 1.0
    sentiment, illegal, length, saw_eos = 0.0, 0, 0, False
    counts: dict[str, int] = {}
    for word, scored in zip(words, mask):
        if word == PAD:
            # Padding is invisible, except inside the scored text, where a policy that emits
            # pad has written something no review contains.
            illegal += int(bool(scored))
            continue
        cat = CATEGORY_OF.get(word, "UNK")
        if scored and (prev, cat) not in legal:
            illegal += 1
        if word in POLARITY:
            if scored:
                sentiment += POLARITY[word] * pending_mult * pending_neg * weight
            pending_mult, pending_neg = 1.0, 1.0
        elif word in INTENSIFIER:
            pending_mult *= INTENSIFIER[word]
        elif word in NEGATOR:
            pending_neg *= NEGATOR[word]
        elif cat in RESET_CATEGORIES:
            pending_mult, pending_neg = 1.0, 1.0
            if cat == "BUT":
                weight = config.but_weight
            elif cat == "END":
                weight = 1.0
        if scored and cat in REPEAT_CATEGORIES:
            counts[word] = counts.get(word, 0) + 1
        prev = cat
        if word == EOS:
            saw_eos = bool(scored)
            break
        if scored:
            length += 1
    s = config.sentiment_scale
    repeats = sum(n - 1 for n in counts.values())
    return (s * math.tanh(sentiment / s)
            - config.illegal_penalty * illegal
            + config.length_bonus * min(length, config.length_cap)
            - config.long_penalty * max(0, length - config.long_after)
            - config.repeat_penalty * repeats
            - config.no_eos_penalty * (not saw_eos))


def _word_of_piece(piece: str) -> str:
    return piece[1:] if piece.startswith("\u2581") else piece


def make_gold_tables(tok: tokenizer_lib.Tokenizer) -> dict[str, np.ndarray]:
    """Per-token-id feature tables [V] (and the category bigram table [C, C]) for `tok`."""
    vocab = tok.vocab_size
    cat_index = {c: i for i, c in enumerate(CATEGORIES)}
    t = dict(cat=np.full(vocab, cat_index["UNK"], np.int32),
             polarity=np.zeros(vocab, np.float32), mult=np.ones(vocab, np.float32),
             negf=np.ones(vocab, np.float32), is_sent=np.zeros(vocab, bool),
             is_int=np.zeros(vocab, bool), is_neg=np.zeros(vocab, bool),
             is_reset=np.zeros(vocab, bool), is_but=np.zeros(vocab, bool),
             is_end=np.zeros(vocab, bool), is_repeat=np.zeros(vocab, bool),
             is_pad=np.zeros(vocab, bool), is_eos=np.zeros(vocab, bool))
    special = {tok.pad_id: PAD, tok.unk_id: UNK, tok.bos_id: BOS, tok.eos_id: EOS}
    for i in range(vocab):
        word = special.get(i, _word_of_piece(tok.id_to_piece(i)))
        cat = CATEGORY_OF.get(word, "UNK")
        t["cat"][i] = cat_index[cat]
        t["polarity"][i] = POLARITY.get(word, 0.0)
        t["is_sent"][i] = word in POLARITY
        t["mult"][i] = INTENSIFIER.get(word, 1.0)
        t["is_int"][i] = word in INTENSIFIER
        t["negf"][i] = NEGATOR.get(word, 1.0)
        t["is_neg"][i] = word in NEGATOR
        t["is_reset"][i] = cat in RESET_CATEGORIES
        t["is_but"][i] = cat == "BUT"
        t["is_end"][i] = cat == "END"
        t["is_repeat"][i] = cat in REPEAT_CATEGORIES
        t["is_pad"][i] = word == PAD
        t["is_eos"][i] = word == EOS
    legal = np.zeros((len(CATEGORIES), len(CATEGORIES)), bool)
    for a, b in LEGAL_BIGRAMS:
        legal[cat_index[a], cat_index[b]] = True
    t["legal"] = legal
    return t


def gold_reward_from_tables(tables, ids_bt, mask_bt, *, config: GoldConfig = GoldConfig()):
    """r*(x, y) for a batch: ids [B, T] int, mask [B, T] (1 on completion) -> rewards [B] f32.

    Pure and jittable: one `lax.scan` over T carrying the negation / intensifier / "but" state,
    plus a one-hot count for repetitions. Matches `gold_reward_reference` exactly in semantics.
    """
    tb = {k: jnp.asarray(v) for k, v in tables.items()}
    ids_bt = jnp.asarray(ids_bt, jnp.int32)
    scored_bt = jnp.asarray(mask_bt) > 0
    batch = ids_bt.shape[0]
    bos_cat = CATEGORIES.index("BOS")

    def step(carry, inputs):
        prev, mult, neg, weight, done, senti, illegal, length, saw_eos = carry
        ids, scored = inputs
        is_pad = tb["is_pad"][ids]
        illegal = illegal + (scored & is_pad & ~done).astype(jnp.int32)
        live = ~is_pad & ~done
        scored = scored & live
        cat = tb["cat"][ids]
        illegal = illegal + (scored & ~tb["legal"][prev, cat]).astype(jnp.int32)
        is_sent, is_int, is_neg = tb["is_sent"][ids], tb["is_int"][ids], tb["is_neg"][ids]
        is_reset = tb["is_reset"][ids] & ~is_sent & ~is_int & ~is_neg
        senti = senti + jnp.where(scored & is_sent, tb["polarity"][ids] * mult * neg * weight,
                                  0.0)
        clear = live & (is_sent | is_reset)
        mult = jnp.where(clear, 1.0, jnp.where(live & is_int, mult * tb["mult"][ids], mult))
        neg = jnp.where(clear, 1.0, jnp.where(live & is_neg, neg * tb["negf"][ids], neg))
        weight = jnp.where(live & is_reset & tb["is_but"][ids], config.but_weight, weight)
        weight = jnp.where(live & is_reset & tb["is_end"][ids], 1.0, weight)
        prev = jnp.where(live, cat, prev)
        is_eos = live & tb["is_eos"][ids]
        saw_eos = saw_eos | (is_eos & scored)
        length = length + (scored & ~is_eos).astype(jnp.int32)
        done = done | is_eos
        return (prev, mult, neg, weight, done, senti, illegal, length, saw_eos), scored

    ones = jnp.ones((batch,), jnp.float32)
    init = (jnp.full((batch,), bos_cat, jnp.int32), ones, ones, ones, jnp.zeros((batch,), bool),
            jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.int32),
            jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool))
    carry, scored_tb = jax.lax.scan(step, init, (ids_bt.T, scored_bt.T))
    _, _, _, _, _, senti, illegal, length, saw_eos = carry
    # Repetitions: counts of repeat-penalised words among the scored tokens, [B, V].
    vocab = tb["cat"].shape[0]
    counted_bt = scored_tb.T & tb["is_repeat"][ids_bt]
    counts_bv = jnp.zeros((batch, vocab), jnp.int32).at[
        jnp.arange(batch)[:, None], ids_bt].add(counted_bt.astype(jnp.int32))
    repeats = jnp.sum(jnp.maximum(counts_bv - 1, 0), axis=-1)
    s = config.sentiment_scale
    length_f = length.astype(jnp.float32)
    return (s * jnp.tanh(senti / s)
            - config.illegal_penalty * illegal
            + config.length_bonus * jnp.minimum(length_f, config.length_cap)
            - config.long_penalty * jnp.maximum(length_f - config.long_after, 0.0)
            - config.repeat_penalty * repeats
            - config.no_eos_penalty * (~saw_eos).astype(jnp.float32))


# --------------------------------------------------------------------------------------------
# Sampler: prompts, completions given a prompt, reviews.
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Probabilities of the review sampler (the "human" distribution behind the SFT corpus)."""

    p_opener: float = 0.5
    p_negate: float = 0.2
    p_intensify: float = 0.3
    p_neutral_clause: float = 0.2
    p_second_sentence: float = 0.35
    sentiment_sharpness: float = 4.0   # P(positive word) = sigmoid(sharpness * z), z ~ U(-1, 1)
    prompt_len: tuple[int, int] = (4, 8)
    completion_len: tuple[int, int] = (8, 24)   # tokens including eos


class _Writer:
    """Emits words for one completion with a latent sentiment z, tracking pending negation."""

    def __init__(self, rng: np.random.Generator, z: float, cfg: SamplerConfig):
        self.rng, self.z, self.cfg = rng, z, cfg
        self.words: list[str] = []

    def pick(self, cat: str) -> None:
        self.words.append(WORDS[cat][self.rng.integers(len(WORDS[cat]))])

    def sentiment(self, lexicon: dict, negated: bool, z: float | None = None) -> None:
        z = self.z if z is None else z
        positive = self.rng.random() < 1.0 / (1.0 + math.exp(-self.cfg.sentiment_sharpness * z))
        # Negation expresses the intended sentiment through the opposite word ("not bad").
        if negated:
            positive = not positive
        pool = [w for w, v in lexicon.items() if (v > 0) == positive]
        self.words.append(pool[self.rng.integers(len(pool))])

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    # Non-terminals of GRAMMAR, one method each.
    def np_(self) -> None:
        form = self.rng.integers(4)
        self.pick("DET")
        if form == 1:
            self.sentiment(POS_ADJ | NEG_ADJ, False)
        elif form == 2:
            self.pick("NADJ")
        self.pick("NOUN")
        if form == 3:
            self.pick("PREP")
            self.pick("DET")
            self.pick("NOUN")

    def adj_phrase(self) -> None:
        negated = self.chance(self.cfg.p_negate)
        if negated:
            self.words.append("not")
        if self.chance(self.cfg.p_intensify):
            self.pick("INT")
        self.sentiment(POS_ADJ | NEG_ADJ, negated)

    def cop_rest(self) -> None:
        self.pick("COP")
        if self.chance(self.cfg.p_neutral_clause):
            self.pick("NADJ")
        else:
            self.adj_phrase()

    def it_rest(self) -> None:
        form = self.rng.integers(3)
        if form == 2:
            self.adj_phrase()
            return
        negated = self.chance(self.cfg.p_negate)
        if negated:
            self.words.append("not")
        self.pick("DET")
        if form == 0:
            if self.chance(self.cfg.p_intensify):
                self.pick("INT")
            self.sentiment(POS_ADJ | NEG_ADJ, negated)
            self.pick("NOUN")
        else:
            self.sentiment(SENT_NOUN, negated)

    def verb_phrase(self) -> None:
        if self.chance(self.cfg.p_neutral_clause):
            self.pick("NVERB")
            self.np_()
            self.pick("TIME")
            return
        negated = self.chance(self.cfg.p_negate)
        if negated:
            self.pick("NEVER")
        elif self.chance(self.cfg.p_intensify):
            self.pick("INT")
        self.sentiment(SENT_VERB, negated)
        self.np_()

    def clause_rest(self, kind: str) -> None:
        {"np": self.cop_rest, "pron": self.it_rest, "subj": self.verb_phrase}[kind]()

    def clause_start(self) -> str:
        kind = ("np", "pron", "subj")[self.rng.integers(3)]
        if kind == "np":
            self.np_()
        elif kind == "pron":
            self.pick("PRON")
            self.pick("COP")
        else:
            self.pick("SUBJ")
        return kind

    def clause(self) -> None:
        self.clause_rest(self.clause_start())

    def sentence_tail(self) -> None:
        """After a sentence's first clause: maybe a second clause, then the end punctuation."""
        form = self.rng.integers(4)
        if form == 1:
            self.words.append(",")
            self.pick("BUT")
            # A contrast usually turns the sentiment around.
            z, self.z = self.z, -self.z if self.chance(0.7) else self.z
            self.clause()
            self.z = z
        elif form == 2:
            self.pick("CONJ")
            self.clause()
        self.pick("END")

    def sentence_head(self) -> str:
        form = self.rng.integers(4)
        if form == 1:
            self.pick("ADV")
            self.words.append(",")
        elif form == 2:
            self.sentiment(SENT_ADV, False)
            self.words.append(",")
        return self.clause_start()


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A prompt's words and the kind of clause it leaves open ("np", "pron" or "subj")."""

    words: tuple[str, ...]
    kind: str

    @property
    def text(self) -> str:
        """The prompt as text (words joined by single spaces)."""
        return " ".join(self.words)


class Testbed:
    """The synthetic review language: tokenizer, sampler, gold reward and datasets.

    `Testbed()` is cheap (a word-level SentencePiece model trained in memory in milliseconds) and
    identical across processes. All sampling takes an explicit seed or numpy Generator.
    """

    def __init__(self, *, gold: GoldConfig = GoldConfig(),
                 sampler: SamplerConfig = SamplerConfig()):
        self.gold_config = gold
        self.sampler_config = sampler
        # Every word type once per line, so the word model keeps all of them as single pieces.
        lines = [" ".join(VOCAB_WORDS)] * 4
        self.tokenizer = tokenizer_lib.train_sentencepiece(
            sentences=lines, vocab_size=len(VOCAB_WORDS) + 4, model_type="word", chat=None)
        self.tables = make_gold_tables(self.tokenizer)
        missing = [w for w in VOCAB_WORDS if self.tables["cat"][self.word_id(w)]
                   == CATEGORIES.index("UNK")]
        assert not missing, f"words without a piece: {missing}"
        self._gold_jit = jax.jit(functools.partial(gold_reward_from_tables, self.tables,
                                                   config=gold))

    # -- tokens ---------------------------------------------------------------------------------
    def word_id(self, word: str) -> int:
        """Token id of a word type (each word is one piece)."""
        return self.tokenizer.piece_to_id("\u2581" + word)

    def encode_words(self, words: Sequence[str]) -> list[int]:
        """Word strings -> token ids, one each."""
        return [self.word_id(w) for w in words]

    def id_to_word(self, idx: int) -> str:
        """Token id -> word string; specials as "<pad>", "<unk>", "<s>", "</s>"."""
        special = {self.tokenizer.pad_id: PAD, self.tokenizer.unk_id: UNK,
                   self.tokenizer.bos_id: BOS, self.tokenizer.eos_id: EOS}
        return special.get(int(idx), _word_of_piece(self.tokenizer.id_to_piece(int(idx))))

    def encode_example(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        """Texts -> (prompt ids with bos, completion ids with eos), the layout every stage uses."""
        return ([self.tokenizer.bos_id] + self.tokenizer.encode(prompt),
                self.tokenizer.encode(completion) + [self.tokenizer.eos_id])

    # -- gold reward ----------------------------------------------------------------------------
    def gold_reward(self, ids_bt, mask_bt):
        """r*(x, y): ids [B, T] (prompt then completion, any padding), mask [B, T] 1 on
        completion tokens -> [B] float32. Jitted; usable inside other jitted functions too via
        `gold_reward_from_tables(testbed.tables, ...)`."""
        return self._gold_jit(ids_bt, mask_bt)

    def gold_reward_text(self, prompt: str, completion: str, *, eos: bool = True) -> float:
        """Reference r*(x, y) for one prompt and completion given as text."""
        p, c = prompt.split(), completion.split() + ([EOS] if eos else [])
        return gold_reward_reference([BOS] + p + c, [0] * (len(p) + 1) + [1] * len(c),
                                     config=self.gold_config)

    # -- sampling -------------------------------------------------------------------------------
    def sample_prompt(self, rng: np.random.Generator) -> Prompt:
        """A 4-8 word prompt: an optional neutral opener sentence, then the start of a sentence
        up to its first clause's subject (which may carry an adjective or a leading adverb)."""
        lo, hi = self.sampler_config.prompt_len
        while True:
            w = _Writer(rng, 0.0, self.sampler_config)
            if w.chance(self.sampler_config.p_opener):
                w.pick("SUBJ")
                w.pick("NVERB")
                w.np_()
                w.pick("TIME")
                w.pick("END")
            kind = w.sentence_head()
            if lo <= len(w.words) <= hi:
                return Prompt(tuple(w.words), kind)

    def sample_completion(self, prompt: Prompt, rng: np.random.Generator, *,
                          z: float | None = None) -> str:
        """A completion (text, without eos) continuing `prompt`, 8-24 tokens counting eos.

        z in [-1, 1] is the latent sentiment of the writer; drawn uniformly when None.
        """
        lo, hi = self.sampler_config.completion_len
        while True:
            zz = float(rng.uniform(-1.0, 1.0)) if z is None else z
            w = _Writer(rng, zz, self.sampler_config)
            w.clause_rest(prompt.kind)
            w.sentence_tail()
            if w.chance(self.sampler_config.p_second_sentence):
                w.clause_rest(w.sentence_head())
                w.sentence_tail()
            if lo <= len(w.words) + 1 <= hi:
                return " ".join(w.words)

    def sft_examples(self, n: int, *, seed: int) -> list[dict]:
        """n reviews as {"prompt": str, "completion": str} (completion excludes eos)."""
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            p = self.sample_prompt(rng)
            out.append({"prompt": p.text, "completion": self.sample_completion(p, rng)})
        return out

    def prompts(self, n: int, *, seed: int) -> list[Prompt]:
        """n prompts (with the clause kind they leave open)."""
        rng = np.random.default_rng(seed)
        return [self.sample_prompt(rng) for _ in range(n)]

    def preference_pairs(self, n: int, *, seed: int, tau: float = 1.0,
                         flip_rate: float = 0.0) -> list[dict]:
        """n Bradley–Terry-labelled pairs for distinct prompts.

        Two completions y1, y2 of the same prompt; y1 is labelled chosen with probability
        sigmoid((r*(y1) - r*(y2)) / tau), then the label flips with probability flip_rate.
        Returns dicts with prompt, chosen, rejected, gold_chosen, gold_rejected.
        """
        rng = np.random.default_rng(seed)
        rows = []
        for _ in range(n):
            p = self.sample_prompt(rng)
            y1 = self.sample_completion(p, rng)
            y2 = self.sample_completion(p, rng)
            while y2 == y1:
                y2 = self.sample_completion(p, rng)
            r1, r2 = self.gold_reward_text(p.text, y1), self.gold_reward_text(p.text, y2)
            first = bool(bradley_terry_labels(np.array([r1]), np.array([r2]), tau=tau,
                                              flip_rate=flip_rate, rng=rng)[0])
            (c, rc), (r, rr) = ((y1, r1), (y2, r2)) if first else ((y2, r2), (y1, r1))
            rows.append(dict(prompt=p.text, chosen=c, rejected=r, gold_chosen=rc,
                             gold_rejected=rr))
        return rows

    def ranked_lists(self, n: int, *, k: int = 4, seed: int, tau: float = 1.0) -> list[dict]:
        """n prompts with k distinct completions ordered best first by a Plackett–Luce sample
        with weights exp(r*/tau). Returns dicts with prompt, responses [k], gold [k]."""
        rng = np.random.default_rng(seed)
        rows = []
        for _ in range(n):
            p = self.sample_prompt(rng)
            ys: list[str] = []
            while len(ys) < k:
                y = self.sample_completion(p, rng)
                if y not in ys:
                    ys.append(y)
            r = np.array([self.gold_reward_text(p.text, y) for y in ys])
            order = plackett_luce_order(r, tau=tau, rng=rng)
            rows.append(dict(prompt=p.text, responses=[ys[i] for i in order],
                             gold=[float(r[i]) for i in order]))
        return rows


def bradley_terry_labels(r1, r2, *, tau: float, flip_rate: float = 0.0,
                         rng: np.random.Generator) -> np.ndarray:
    """Samples "y1 preferred" [N] bool with P = sigmoid((r1 - r2) / tau) (Bradley & Terry 1952),
    then flips each label with probability flip_rate. tau=0 gives the noiseless argmax (ties
    broken towards y1)."""
    r1, r2 = np.asarray(r1, np.float64), np.asarray(r2, np.float64)
    if tau > 0:
        p = 0.5 * (1.0 + np.tanh((r1 - r2) / (2.0 * tau)))  # sigmoid, no overflow
        first = rng.random(r1.shape) < p
    else:
        first = r1 >= r2
    flip = rng.random(r1.shape) < flip_rate
    return first ^ flip


def plackett_luce_order(r, *, tau: float, rng: np.random.Generator) -> np.ndarray:
    """A ranking (indices, best first) drawn from Plackett–Luce with weights exp(r / tau)
    (Plackett 1975; Luce 1959), by sorting Gumbel-perturbed scores."""
    r = np.asarray(r, np.float64)
    if tau <= 0:
        return np.argsort(-r, kind="stable")
    return np.argsort(-(r / tau + rng.gumbel(size=r.shape)), kind="stable")
