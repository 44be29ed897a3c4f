"""Refusal-token fine-tuning on the CPU: teach a small chat model to open each response with a category refusal token
or ``[respond]`` (P1's subject in miniature; Jain et al., "Refusal Tokens", PAPERS §1).

The recipe (issue 3; measured costs and lessons in MODELS.md):

1. **Data** (:func:`assemble_data`). Harmful side: training split of the harmful prompts, grouped by category
   (default: CatQA + BeaverTails-Evaluation + Do-Not-Answer, split per category, plus the training half of the
   JBB harmful pairs); each target is the category token followed by a short refusal sentence drawn from
   :data:`REFUSAL_SENTENCES` (varied wording, optionally with a category reason). Benign side: ordinary
   instructions (Alpaca) *and* benign questions on the same topics (CoCoNot pref, the training halves of CoCoNot
   contrast and JBB benign, the built-in lookalikes' training split), each target ``[respond]`` followed by the
   model's own greedy answer before fine-tuning (self-distillation; :func:`distill_answers`, cached). Ordinary
   prompts are drawn to match the harmful side's question/instruction mix (:func:`prompt_form`), so "question" or
   "sensitive topic" does not predict refusal. Training prompts are removed when they duplicate an evaluation
   prompt, then :func:`catlens.prompts.check_leakage` must pass between the training set and every evaluation set.
   Without a data directory, the training split of the built-in prompt set is used (offline).
2. **New tokens** (:func:`add_refusal_tokens`): one ``[refuse:<category>]`` per category plus ``[respond]`` (or
   ``[refuse]`` + ``[respond]`` for the binary variant), embeddings resized. Because the embeddings are tied, a new
   token's row is both its input embedding and its unembedding. ``init="prototype"`` sets each row to the stock
   model's mean final (post-norm) hidden state at the first response position over the token's own training prompts
   (``[respond]``: the benign prompts), rescaled so that its mean logit on those prompts equals their mean top
   stock logit: the new tokens start competitive with the vocabulary at the first response position and ranked by
   similarity. Because the row is also the token's *input* embedding, the newline token's embedding is added
   underneath (``prototype_anchor``): read as input, the new token then looks like one more newline after the
   assistant header, and the stock model continues its answer unchanged (a bare prototype made it continue
   mid-sentence: the "swallowed first word" after ``[respond]``). ``init="mean"`` uses the mean embedding row
   (slow to learn; kept for comparison).
3. **Training** (:func:`train`): next-token cross-entropy on the response tokens only, the first response token
   weighted ``first_token_weight`` times; AdamW, linear warm-up then linear decay, gradient clipping 1.0, a seeded
   batch schedule (both sides in every batch), ``method`` = ``full`` | ``last-k`` (the last ``last_k`` blocks, the
   final norm and the new token rows; the backward pass stops at the first trainable block) | ``lora``
   (peft rank-``lora_rank`` adapters on every linear layer plus the new token rows; merged before saving). The new token
   rows learn at their own rate ``new_token_lr`` (they are the decision's read-out; at the body's rate Adam moves
   them by about ``lr`` per coordinate per step, far too little). Checkpoints are written atomically every ``checkpoint_every`` steps and an
   interrupted run resumes from the last one with identical results.
4. **Result** (:func:`finetune`): an ordinary checkpoint folder ``cache_dir()/finetunes/<name>`` (safetensors,
   tokenizer with the new tokens, chat template, a :class:`catlens.runs.RunDir` ``manifest.json`` whose
   ``finetune`` entry holds the data hashes and hyperparameters (older folders carry ``catlens_finetune.json``,
   still read), ``train_log.csv``), reused when the config and data hashes match and loadable with
   ``catlens.load_model(folder)``. :func:`ensure_refusal_model` returns it, training it first if missing.

Generation with the result should use :func:`catlens.refusal.generate` (special tokens only at the first position).

Modules (one concern each): :mod:`~catlens.finetune.config` (config, presets, ``--set`` conversion),
:mod:`~catlens.finetune.data` (benchmark data recipe), :mod:`~catlens.finetune.targets` (refusal sentences, tokens,
examples), :mod:`~catlens.finetune.distill` (distillation cache), :mod:`~catlens.finetune.surgery` (new tokens,
prototype init, LoRA, trainable masks), :mod:`~catlens.finetune.training` (training loop),
:mod:`~catlens.finetune.manifest` (the RunDir record) and :mod:`~catlens.finetune.run` (driver). The command line
is ``catlens finetune`` in :mod:`catlens.cli`. The fine-tune runs on any device (``device``/``dtype`` fields) and
sets no process-wide state (threads, global seeds): entry points do (:func:`catlens.runs.configure_process`).
"""

from catlens.finetune.config import (  # noqa: F401
    CONFIGS,
    DATA_SOURCES,
    DEFAULT_CATEGORIES,
    INITS,
    METHODS,
    SCHEMES,
    FinetuneConfig,
    check_value,
    default_name,
    get_config,
    parse_overrides,
)
from catlens.finetune.data import TrainingData, assemble_data, prompt_form  # noqa: F401
from catlens.finetune.distill import distill_answers, greedy_answers, model_key  # noqa: F401
from catlens.finetune.manifest import (  # noqa: F401
    LEGACY_MANIFEST,
    MANIFEST,
    build_manifest,
    read_manifest,
    save_finetune,
)
from catlens.finetune.run import Prepared, check_inputs, ensure_refusal_model, finetune, prepare  # noqa: F401
from catlens.finetune.surgery import (  # noqa: F401
    add_refusal_tokens,
    apply_lora,
    init_new_embeddings,
    last_position_hidden,
    merge_lora,
    prototype_rows,
    set_trainable,
)
from catlens.finetune.targets import (  # noqa: F401
    REFUSAL_REASONS,
    REFUSAL_SENTENCES,
    Example,
    build_examples,
    refusal_text,
    refusal_tokens_for,
)
from catlens.errors import NonFiniteLossError  # noqa: F401  (the training loop raises it)
from catlens.finetune.training import (  # noqa: F401
    TrainResult,
    collate,
    lr_scale,
    make_schedule,
    response_loss,
    train,
)
