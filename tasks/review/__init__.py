"""Layered annotation and expert review (issue 21): machine labels for every item, a person for what matters.

Where review sits. Two review points, each a pair of stages in flows/pipeline.py with one config
section (infra/config_review.py), both off by default:

    pii_scrub       -> annotate_docs  -> [gate] -> review_docs   -> train_tokenizer, tokenize
    preference_data -> annotate_pairs -> [gate] -> review_pairs  -> reward_model, dpo, ppo

The downstream stages read `review_docs` / `review_pairs`. With the section off both stages are
disabled and a disabled stage passes its first input through (infra/stage.py), so the readers get
the same ref and every downstream version stays what it was (tests/tasks/review checks this).

1. annotate (a task, tasks/review/stages.py): every item gets machine labels we already compute
   and a risk score (tasks/review/labels.py has the formulas):
   - documents: `language` and `quality` (high / low at a quality_score of 0.5) as labels a
     reviewer can correct; signals: language_score, quality_score, PII placeholders per type
     (meta["pii"] from pii_scrub), and the verdict of the PUBLISHED default heuristic rules (a
     second opinion: the demo relaxes them for source code);
     risk = 0.35 (1 - quality_score) + 0.25 min(1, pii / 3) + 0.25 [fails the default rules]
            + 0.15 (1 - language_score), an unknown score counting 0.5.
   - preference pairs (token ids only: texts are decoded with the tokenizer for the reviewer):
     label `preference` (as_given / swapped); signals: reply lengths in tokens and their
     difference; risk = 0.7 clip((rejected - chosen) / longer, 0, 1) + 0.3 [both replies equal]
     (a chosen reply much shorter than the rejected one is where a length-biased label errs).
     With `review_pairs.reward_model` (a reward model trained earlier: `reward_model@<version>`
     in this store, or a directory; tasks/review/reward.py) every pair also gets rm_chosen,
     rm_rejected and rm_margin = r(chosen) - r(rejected), and
     risk = 0.5 max(0, tanh(-rm_margin / 2)) + 0.35 clip((rejected - chosen) / longer, 0, 1)
            + 0.15 [both replies equal],
     the first term being 2 P(rejected better) - 1 under the Bradley-Terry model the reward
     model was trained with (0 for a margin >= 0, 0.46 at -1, 0.76 at -2). Unset, the formula
     above holds exactly and versions stay what they were; a directory's files are hashed into
     the stage's input fingerprint, a store version is named in the identity.
   Output: annotations.parquet (every item), sample.json (the batch a reviewer sees: the top_k
   highest-risk items, then random_k drawn uniformly by a seeded RNG from the rest).
2. gate (flow level, flows/review.py, because Prefect pauses only a flow): when the review stage's
   version is not committed and some sampled item has no decision yet, it publishes the batch as
   a markdown artifact and pauses with a typed form (pause_flow_run(wait_for_input=...)): per item
   approve / reject / relabel, a reason, relabels as `label=value`, and the reviewer's name. The
   answer is written to the decision log. on_timeout: keep_paused (pause for 30 days) or
   proceed_machine_labels (log a batch with source "timeout" naming the unanswered items; the run
   goes on with the machine labels only).
3. apply (a task): rejected items are dropped, relabelled items changed (documents: meta["labels"];
   pairs with preference=swapped: chosen and rejected exchanged), every reviewed item marked
   (meta["review"] for documents). Output: the data in its input's format (document shards, or
   preference shards + index.json) and decisions.json: every decision applied (who, when, what,
   which item, from which batch) and the gate's outcome. Stats: reviewed counts, agreement of the
   machine labels with the reviewers per label (pairs with a reward model: also `reward_model`,
   how often the side it prefers is the one the reviewer kept), and the error rate of the unreviewed remainder
   estimated from the random share with a 95% Wilson interval (also in `lmf report`).

Decisions are keyed by content hash (documents: sha256 of the text; pairs: the pair id, a hash of
its text), in an append-only log `reviews/<docs|pairs>/<time>-<batch>.json` of the store (the
latest decision for a hash wins), so the same items coming again are not asked again. A committed
review version is final for its inputs: after importing late decisions run
`lmf run --force review_docs`. Label Studio: `lmf review export` / `lmf review import`
(tasks/review/label_studio.py).
"""
