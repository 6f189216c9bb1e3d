"""A small mutation run: plant realistic bugs one at a time and check that the tests notice.

    .venv/bin/python tools/mutate.py                 # every mutant with fast tests (make mutate)
    .venv/bin/python tools/mutate.py --slow          # and those that need a slow test (a minute more)
    .venv/bin/python tools/mutate.py --only gather   # mutants whose name contains "gather"
    .venv/bin/python tools/mutate.py --list
    .venv/bin/python tools/mutate.py --slow --timeout 900   # a loaded machine: more time for each run

Each mutant is (file, original snippet, mutated snippet, tests). The script copies the package, tests and
configs to a temporary directory once, and for each mutant patches the copy, runs only that mutant's
tests there (``PYTHONPATH`` pointing at the copy, so subprocesses see the mutant too) and restores the
file. The working tree is never modified. Results:
  caught     a test failed on an assertion or on an error the mutant causes (pytest's "tests failed")
  survived   the tests passed with the bug planted: a missing test, or a bug the tests cannot see
             (TESTING.md lists each survivor with its explanation)
  stale      the original snippet is no longer in the file (the code was rewritten): update the mutant
  timed out  the tests did not end within the time limit (TIMEOUT_S, or --timeout): a hang the mutant
             caused, or a machine too loaded; not caught, since no test said anything
  crashed    pytest itself did not run the tests (a collection error, an internal error, no tests
             collected, killed by a signal): not caught either, since no test judged the mutant
A baseline run of all selected tests on the unmutated copy comes first; if it fails, nothing is judged.
Exit status: 0 when the baseline passed and every mutant was caught, stale or an explained survivor;
1 when one survived unexplained, timed out or crashed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("retclip_dist", "tests", "configs", "pyproject.toml")
TIMEOUT_S = 300
TIMED_OUT = -1000  # what _pytest returns when the tests ran past TIMEOUT_S (no exit status of pytest's)
VERDICTS = ("caught", "survived", "stale", "timed out", "crashed")


@dataclass(frozen=True)
class Mutant:
    name: str  # short id, also what --only matches
    path: str  # file under the repository root
    original: str  # snippet that must occur exactly once
    mutated: str  # what replaces it
    tests: tuple[str, ...]  # pytest node ids or files, run in the copy
    expect_survive: str = ""  # why the fast tests cannot see it (documented survivors only)
    slow: bool = False  # its test is marked slow (about a minute): run only with --slow


AUG = "retclip_dist/data/augment.py"
MET = "retclip_dist/eval/metrics.py"
ZS = "retclip_dist/eval/zeroshot.py"
IMG = "retclip_dist/shards/images.py"
DICOM = "retclip_dist/shards/dicom.py"
CROP = "retclip_dist/shards/crop.py"
SCRUB = "retclip_dist/shards/scrub.py"
AUDIT = "retclip_dist/shards/audit.py"
BUILD = "retclip_dist/shards/build.py"
LOSS = "retclip_dist/loss.py"
CKPT = "retclip_dist/train/checkpoint.py"
STEP = "retclip_dist/train/step.py"
LOOP = "retclip_dist/train/loop.py"
LOADER = "retclip_dist/data/loader.py"
PLAN = "retclip_dist/data/plan.py"
STREAMS = "retclip_dist/data/streams.py"
TELE = "retclip_dist/train/telemetry.py"
PROBE = "retclip_dist/train/probe.py"
WEIGHTS = "retclip_dist/model/weights.py"
PREFLIGHT = "retclip_dist/train/preflight.py"
SAMPLES = "retclip_dist/data/samples.py"
SUMMARY = "retclip_dist/train/run_summary.py"
EXPORT_CLI = "retclip_dist/export/cli.py"
API = "retclip_dist/api.py"
DOG = "retclip_dist/runtime/watchdog.py"
REQUEUE = "retclip_dist/launch/requeue.py"
RESHAPE = "retclip_dist/data/reshape.py"
PSEUDONYM = "retclip_dist/shards/pseudonym.py"
RUNLOCK = "retclip_dist/train/runlock.py"
RETCLIP = "retclip_dist/model/retclip.py"
BACKEND = "retclip_dist/train/backend.py"

T_AUG = "tests/test_data_augment.py"
T_AUG_PATHS = f"{T_AUG}::test_cpu_and_device_paths_agree_on_real_crops"
T_AUG_JITTER = f"{T_AUG}::test_jitter_and_erasing_match_exactly_on_a_solid_image"
T_EYES = "tests/test_strength_data.py::test_device_path_applies_each_eyes_own_parameters_like_the_cpu_path"
T_SHUFFLE = (
    "tests/test_strength_data.py::test_shuffle_buffer_order_changes_with_the_epoch_and_repeats_within_it"
)
T_LOADER = "tests/test_data_loader.py"
T_MET = "tests/test_eval_metrics.py"
T_MACRO = "tests/test_strength_metrics.py"
T_ZS = "tests/test_strength_zeroshot.py"
T_IMG = "tests/test_strength_images.py"
T_DICOM = "tests/test_shards_dicom.py"
T_META = "tests/test_shards_metadata.py"
T_CROP = "tests/test_shards_crop.py"
T_SCRUB = "tests/test_shards_scrub.py"
T_AUDIT = "tests/test_shards_audit.py"
T_PSEUDO = "tests/test_shards_pseudonymise.py"
T_GATHER = "tests/test_strength_gather.py"
T_LOSS = "tests/test_loss.py"
T_CKPT = "tests/test_strength_checkpoint.py"
T_STEP = "tests/test_train_step.py"
T_TELE_RANK = "tests/test_telemetry.py::test_max_over_ranks_names_the_rank_with_the_slow_loader"
T_TELE_CLOCK = "tests/test_telemetry.py::test_step_clock_does_not_count_the_wait_for_the_end_of_the_loader"
T_KEEP_BEST = (
    "tests/test_strength_checkpoint.py::test_keep_best_survives_keep_last_and_a_resume_knows_its_value"
)
T_PROBE = "tests/test_train_probe.py::test_probe_of_the_live_model_equals_retclip_eval_linear_probe"
T_STRICT = "tests/test_model.py::test_vision_weights_refuse_a_missing_tensor_unless_named"
T_PREFLIGHT_MODEL = "tests/test_model_preflight.py::test_model_mistake_is_one_line_and_exit_2_before_training"
T_DUP_TOKENS = (
    "tests/test_duplicates.py::test_reports_equal_in_their_first_context_length_tokens_are_duplicates"
)
T_FORK_STRESS = "tests/test_runtime_workers.py::test_hundreds_of_worker_starts_beside_thread_churn_never_hang"
# The hang is a race the stress test meets only sometimes on a loaded machine; this test sees every fork:
# a worker forked from the rank is the rank's child, not the one-thread fork server's.
T_FORK_PARENT = "tests/test_runtime_workers.py::test_workers_ignore_the_stop_signals_and_die_with_their_rank"
T_DOG = "tests/test_watchdog.py::test_a_rank_stuck_in_its_own_work_dumps_its_stacks_and_ends_with_exit_code_5"
T_REQUEUE = "tests/test_watchdog.py::test_a_fault_is_requeued_until_it_repeats_without_a_newer_checkpoint"
T_RESHAPE = "tests/test_data_plan.py::test_reshaped_tails_read_every_unused_sample_once"
T_RESHAPE_LOADER = f"{T_LOADER}::test_resume_on_another_layout_uses_the_epochs_patients_once"
T_LOCK_HOST = (
    "tests/test_faults_train.py::test_lock_from_another_host_is_stale_only_after_its_heartbeat_stops"
)
T_LOCK_PID = "tests/test_faults_train.py::test_lock_holder_pid_reused_by_another_process_is_stale"
T_DUP_RANKS = "tests/test_duplicates.py::test_two_ranks_equal_one_with_duplicates_across_ranks"
T_CLAMP_STEP = (
    "tests/test_train.py::test_a_step_that_pushes_the_logit_scales_past_the_clamp_leaves_them_at_its_bound"
)
T_PREFLIGHT = "tests/test_faults_train.py::test_preflight_names_the_field_and_the_reason"
T_PREFLIGHT_RESUME = (
    "tests/test_data_position.py::test_the_config_check_refuses_the_same_resumes_before_any_process_starts"
)

MUTANTS = [
    # --- augmentation
    Mutant(
        "augment-eyes-swapped-on-device",
        AUG,
        'augment_batch(images, batch[f"{eye}_params"], self.image)',
        """augment_batch(images, batch[f"{'right' if eye == 'left' else 'left'}_params"], self.image)""",
        (T_EYES,),
    ),
    Mutant(
        "augment-no-erasing-on-device",
        AUG,
        "return x.masked_fill_(_erase_mask(params, size), 0.0)",
        "return x",
        (T_AUG_PATHS,),
    ),
    Mutant(
        "augment-flip-ignored-on-device",
        AUG,
        "ux = torch.where(params[:, 4:5] > 0.5, 1.0 - u, u)",
        "ux = torch.where(params[:, 4:5] > 0.5, u, u)",
        (T_AUG_PATHS,),
    ),
    Mutant(
        "augment-erase-rounding-differs",
        AUG,
        "torch.floor(params[:, 8:12].double() * size + 0.5)",
        "torch.floor(params[:, 8:12].double() * size)",
        (T_AUG_PATHS,),
    ),
    Mutant(
        "augment-params-ignore-epoch",
        AUG,
        "np.random.default_rng([seed % 2**64, epoch, digest])",
        "np.random.default_rng([seed % 2**64, 0, digest])",
        (f"{T_AUG}::test_params_depend_only_on_seed_epoch_and_key",),
    ),
    Mutant(
        "augment-contrast-reads-saturation",
        AUG,
        "x = TF.adjust_contrast(x, float(row[6]))",
        "x = TF.adjust_contrast(x, float(row[7]))",
        (T_AUG_JITTER,),
    ),
    # --- data order (plan and loader are being rewritten: these may go stale)
    Mutant(
        "shuffle-buffer-seed-ignores-epoch",
        LOADER,
        "stream_seed(self.seed, self.epoch, p, w, self.generation)",
        "stream_seed(self.seed, 0, p, w, self.generation)",
        (T_SHUFFLE,),
    ),
    Mutant(
        "shard-order-ignores-epoch",
        PLAN,
        "random.Random(derive_seed(seed, epoch)).shuffle(order)",
        "random.Random(derive_seed(seed, 0)).shuffle(order)",
        ("tests/test_data_plan.py",),
    ),
    Mutant(
        "loader-forgets-resume-position",
        LOADER,
        'self.positions[expected] = list(meta["positions"])',
        "self.positions[expected] = list(self.positions[expected])",
        (f"{T_LOADER}::test_resume_continues_with_the_uninterrupted_batches",),
    ),
    Mutant(
        "resume-ignores-a-new-shuffle-buffer",
        "retclip_dist/data/position.py",
        'RESHAPED = ("rank", "world_size", "partitions", "workers", "batch_size", "shuffle_buffer")',
        'RESHAPED = ("rank", "world_size", "partitions", "workers", "batch_size")',
        (
            "tests/test_data_position.py::test_a_resume_with_another_shuffle_buffer_reads_the_rest_of_the_epoch_once",
        ),
    ),
    Mutant(
        "epoch-tally-not-carried-by-a-resume",
        LOADER,
        'self.epoch_patients = list(state.get("epoch_patients", []))',
        "self.epoch_patients = []",
        ("tests/test_data_position.py::test_an_exact_resume_carries_the_epochs_tally",),
    ),
    Mutant(
        "shuffle-buffer-emits-in-order",
        STREAMS,
        "i = rng.randrange(size)",
        "i = 0",
        (
            "tests/test_strength_data.py::test_a_small_shuffle_buffer_mixes_the_whole_stream_not_only_its_tail",
        ),
    ),
    # --- metrics
    Mutant(
        "multiclass-macro-auroc-support-weighted",
        MET,
        '"macro_f1": float(np.mean(f1)),\n        "macro_auroc": _macro([m["auroc"] for m in per_class.values()]),',
        '"macro_f1": float(np.mean(f1)),\n        "macro_auroc": float(np.average([m["auroc"] or 0.5 for m in '
        'per_class.values()], weights=[m["support"] for m in per_class.values()])),',
        (T_MACRO,),
    ),
    Mutant(
        "multilabel-macro-auroc-support-weighted",
        MET,
        '"mAP": _macro([m["auprc"] for m in per_class.values()]),\n        "macro_auroc": _macro([m["auroc"] '
        "for m in per_class.values()]),",
        '"mAP": _macro([m["auprc"] for m in per_class.values()]),\n        "macro_auroc": float(np.average('
        '[m["auroc"] for m in per_class.values()], weights=[m["support"] for m in per_class.values()])),',
        (T_MACRO,),
    ),
    Mutant(
        "multiclass-macro-f1-support-weighted",
        MET,
        '"macro_f1": float(np.mean(f1)),',
        '"macro_f1": float(f1_score(labels, predicted, labels=indices, average="weighted", zero_division=0)),',
        (T_MACRO,),
    ),
    Mutant(
        "single-class-auroc-counted-as-half",
        MET,
        "if y.min() == y.max():\n        return None, None",
        "if y.min() == y.max():\n        return 0.5, 0.5",
        (T_MET,),
    ),
    Mutant(
        "kappa-linear-weights",
        MET,
        'weights="quadratic"',
        'weights="linear"',
        (T_MET,),
    ),
    Mutant(
        "undefined-selection-metric-scores-zero",
        MET,
        'return float("-inf") if value is None else float(value)',
        "return 0.0 if value is None else float(value)",
        (T_MACRO,),
    ),
    # --- zero-shot
    Mutant(
        "zero-shot-patient-text-head-for-every-image-head",
        ZS,
        "features[mask] @ classes_emb[head].T",
        'features[mask] @ classes_emb["patient"].T',
        (T_ZS,),
    ),
    Mutant(
        "zero-shot-class-embeddings-from-patient-head",
        ZS,
        "per_prompt = getattr(levels, head)",
        'per_prompt = getattr(levels, "patient")',
        (T_ZS,),
    ),
    Mutant(
        "zero-shot-patient-scale-for-every-head",
        ZS,
        "scale = model.logit_scale[head]",
        'scale = model.logit_scale["patient"]',
        (T_ZS,),
    ),
    # --- shard images
    Mutant(
        "max-pixels-off-by-one",
        IMG,
        "if width * height > opts.max_pixels:",
        "if width * height >= opts.max_pixels:",
        (T_IMG,),
    ),
    Mutant(
        "min-side-off-by-one",
        IMG,
        "if min(width, height) < opts.min_side:",
        "if min(width, height) <= opts.min_side:",
        (T_IMG,),
    ),
    # --- DICOM exports (make-shards build --dicom)
    Mutant(
        "dicom-eyes-swapped",
        DICOM,
        '_LATERALITY = {"L": "left", "R": "right"}',
        '_LATERALITY = {"L": "right", "R": "left"}',
        (f"{T_DICOM}::test_laterality_comes_from_image_laterality_else_laterality",),
    ),
    Mutant(
        "dicom-ybr-kept-as-stored",
        DICOM,
        "decoder.as_array(ds, index=0, decoding_plugin=plugin)",
        "decoder.as_array(ds, index=0, decoding_plugin=plugin, raw=True)",
        (f"{T_DICOM}::test_colour_photos_decode_to_rgb_as_the_standard_defines",),
    ),
    Mutant(
        "dicom-monochrome1-not-inverted",
        DICOM,
        "eight = 255 - eight",
        "eight = eight",
        (f"{T_DICOM}::test_grey_and_palette_photos_decode_as_the_standard_defines",),
    ),
    Mutant(
        "dicom-grey-photo-chosen-before-colour",
        DICOM,
        "return (not photo.colour, not photo.acquired",
        "return (photo.colour, not photo.acquired",
        (f"{T_DICOM}::test_one_photo_per_eye_is_chosen_by_the_documented_rule_and_the_rest_counted",),
    ),
    Mutant(
        "dicom-val-split-per-visit",
        DICOM,
        "visit = Visit(patient, number, per_eye, split_of(patient))",
        'visit = Visit(patient, number, per_eye, split_of(f"{patient}-v{number}"))',
        (f"{T_DICOM}::test_val_fraction_keeps_all_visits_of_a_patient_in_one_split",),
    ),
    # --- shards that leave the hospital (issue 20)
    Mutant(
        "source-metadata-carried-through",
        IMG,
        'clean = Image.frombytes("RGB", rgb.size, rgb.tobytes())',
        "clean = rgb",
        (T_META,),
    ),
    Mutant(
        "crop-leaves-ringing-outside-the-circle",
        CROP,
        "pixels[outside_mask(square.size, Circle(side / 2, side / 2, side / 2))] = 0",
        "pixels[outside_mask(square.size, Circle(side / 2, side / 2, side / 2 + 3))] = 0",
        (T_CROP,),
    ),
    Mutant(
        "scrub-misses-long-digit-runs",
        SCRUB,
        r'("[NUMBER]", _D + r"\d{6,}" + _ND, 0)',
        r'("[NUMBER]", _D + r"\d{9,}" + _ND, 0)',
        (T_SCRUB,),
    ),
    Mutant(
        "audit-skips-jpeg-metadata",
        AUDIT,
        'yield i, end, "meta" if (0xE0 <= marker <= 0xEF or marker == 0xFE) else "table"',
        'yield i, end, "scan" if (0xE0 <= marker <= 0xEF or marker == 0xFE) else "table"',
        (T_AUDIT,),
    ),
    Mutant(
        "plain-source-hash-under-pseudonymise",
        BUILD,
        "source_digest: Callable[[str], str] = pseudonymiser.source_digest if pseudonymiser else (lambda d: d)",
        "source_digest: Callable[[str], str] = lambda d: d",
        (T_PSEUDO,),
    ),
    # --- loss and its collective
    Mutant(
        "gather-gradient-detached",
        LOSS,
        "return _AllGather.apply(x, group, world)",
        "return _AllGather.apply(x.detach(), group, world)",
        (T_GATHER,),
    ),
    Mutant(
        "gather-removed",
        LOSS,
        "    if world == 1:\n        return x\n    if check_rows:",
        "    if world >= 1:\n        return x\n    if check_rows:",
        (T_GATHER,),
    ),
    Mutant(
        "gather-backward-without-sum",
        LOSS,
        "_reduce_scatter_single(local, grad.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)",
        "local.copy_(grad.view(world, -1, *grad.shape[1:])[dist.get_rank(ctx.group)])",
        (T_GATHER,),
    ),
    Mutant(
        "row-offset-ignores-rank",
        LOSS,
        "return rank * local_rows",
        "return 0 * rank * local_rows",
        (T_GATHER,),
    ),
    Mutant(
        "infonce-one-direction",
        LOSS,
        "return (image_to_text + text_to_image) / 2",
        "return image_to_text",
        (T_LOSS,),
    ),
    Mutant(
        "sigmoid-positives-ignore-offset",
        LOSS,
        "signs[rows, rows + offset] = 1.0",
        "signs[rows, rows] = 1.0",
        (T_LOSS,),
    ),
    # --- weights and the model's pre-flight check
    Mutant(
        "weights-load-not-strict",
        WEIGHTS,
        "    if refused_missing or refused_unexpected:\n",
        "    if False:\n",
        (T_STRICT,),
    ),
    Mutant(
        "preflight-skips-the-model-build",
        PREFLIGHT,
        "    _model_builds(cfg.model)\n",
        "",
        (T_PREFLIGHT_MODEL,),
    ),
    Mutant(
        "duplicates-hash-the-cleaned-text",
        SAMPLES,
        "token_hash(ids[level][row])",
        "token_hash(list(clean_report(patients[row].reports[level]).encode()))",
        (T_DUP_TOKENS,),
    ),
    Mutant(
        "duplicates-eye-levels-hash-the-patient-report",
        SAMPLES,
        'levels = ("patient", *(eye if cfg.eye_reports else "patient" for eye in EYES))',
        'levels = ("patient", "patient", "patient")',
        (T_DUP_TOKENS,),
    ),
    # --- checkpoint and step
    Mutant(
        "checkpoint-keeps-one-too-many",
        CKPT,
        "for old in self.complete()[: -self.keep_last]:",
        "for old in self.complete()[: -self.keep_last - 1]:",
        (T_CKPT,),
    ),
    Mutant(
        "keep-best-pruned-by-keep-last",
        CKPT,
        "                if old.name != kept:",
        "                if True:",
        (T_KEEP_BEST,),
    ),
    Mutant(
        "resume-forgets-the-best",
        CKPT,
        'self.best = best if best is not None and best["metric"] == self.keep_best else None',
        "self.best = None",
        (T_KEEP_BEST,),
    ),
    Mutant(
        "probe-on-tower-features",
        PROBE,
        'cfg.features.head = "projected"',
        'cfg.features.head = "tower"',
        (T_PROBE,),
    ),
    Mutant(
        "checkpoint-drops-loader-position",
        CKPT,
        'data_state = None if missing else {"ranks": [json.loads(f.read_text()) for f in files]}',
        "data_state = None",
        (T_CKPT,),
    ),
    Mutant(
        "checkpoint-load-reseeds",
        CKPT,
        "        self.accelerator.load_state(str(path))\n",
        "        self.accelerator.load_state(str(path))\n        __import__('torch').manual_seed(0)\n",
        (T_CKPT,),
    ),
    Mutant(
        "resume-reseeds-after-restore",
        LOOP,
        "    restored = checkpointer.load(cfg.checkpoint.resume)\n",
        "    restored = checkpointer.load(cfg.checkpoint.resume)\n    if restored:\n        set_seed(cfg.train.seed)\n",
        ("tests/test_strength_resume.py",),
        slow=True,
    ),
    Mutant(
        "chunk-replay-without-rng",
        STEP,
        "with sync, _replay_rng(states[n], device):",
        "with sync:",
        (T_STEP,),
    ),
    Mutant(
        "chunk-scale-gradient-every-chunk",
        STEP,
        "                elif last:\n",
        "                else:\n",
        (T_STEP,),
    ),
    Mutant(
        "chunk-syncs-every-chunk",
        STEP,
        "sync = contextlib.nullcontext() if last else accelerator.no_sync(model)",
        "sync = contextlib.nullcontext()",
        (T_STEP,),
        expect_survive="performance only: DDP would all-reduce every chunk, with the same gradients",
    ),
    # --- telemetry (which rank is slow)
    Mutant(
        "telemetry-max-rank-is-the-fastest",
        TELE,
        "top = int(column.argmax())",
        "top = int(column.argmin())",
        (T_TELE_RANK,),
    ),
    Mutant(
        "telemetry-max-over-ranks-is-the-mean",
        TELE,
        'f"{name}_max": column[top].item()',
        'f"{name}_max": column.mean().item()',
        (T_TELE_RANK,),
    ),
    Mutant(
        "telemetry-counts-the-wait-for-the-loaders-end",
        TELE,
        "            except StopIteration:\n                return\n",
        "            except StopIteration:\n                self.total_wait += time.perf_counter() - start\n                return\n",
        (T_TELE_CLOCK,),
    ),
    Mutant(
        "card-shows-free-text",
        SUMMARY,
        "        return value in choices\n",
        "        return True\n",
        ("tests/test_model_card.py::test_changes_show_numbers_and_choices_and_leave_free_text_out",),
    ),
    Mutant(
        "card-step-time-counts-from-zero",
        SUMMARY,
        "        previous = step\n",
        "",
        ("tests/test_model_card.py::test_step_time_counts_a_replayed_step_once",),
    ),
    Mutant(
        "export-publishes-unchecked",
        EXPORT_CLI,
        "    diff = verify_timm(model, out, head)\n",
        "    diff = 0.0\n",
        ("tests/test_export.py::test_an_export_that_differs_from_the_model_is_not_published",),
    ),
    Mutant(
        "api-zero-shot-ignores-the-eye",
        API,
        "heads = [eyes] * len(pixels) if isinstance(eyes, str) else list(eyes)",
        'heads = ["left"] * len(pixels)',
        ("tests/test_api.py::test_images_and_zero_shot_equal_retclip_eval",),
    ),
    # --- a job never stalls (issue 19)
    Mutant(
        "loader-workers-forked-from-the-rank",
        LOADER,
        '"multiprocessing_context": worker_context(),',
        '"multiprocessing_context": __import__("multiprocessing").get_context("fork"),',
        (T_FORK_PARENT, T_FORK_STRESS),
        slow=True,
    ),
    Mutant(
        "watchdog-gives-waiting-ranks-no-more-time",
        DOG,
        "return self.stall_s + self.collective_s + WAIT_MARGIN_S",
        "return self.stall_s",
        (T_DOG,),
        slow=True,
    ),
    Mutant(
        "requeue-budget-counts-faults-across-checkpoints",
        REQUEUE,
        '        if entry.get("checkpoint") != newest:\n            break\n',
        '        if entry.get("checkpoint") is None:\n            break\n',
        (T_REQUEUE,),
    ),
    # --- issue 22: code that had no mutant
    Mutant(
        "reshape-replay-forgets-the-generation",
        RESHAPE,
        "order = emission_order(len(items), segment.buffer, stream_seed(seed, epoch, p, w, generation))",
        "order = emission_order(len(items), segment.buffer, stream_seed(seed, epoch, p, w, 0))",
        (T_RESHAPE, T_RESHAPE_LOADER),
    ),
    Mutant(
        "reshape-replay-ignores-the-shuffle-buffer",
        RESHAPE,
        "order = emission_order(len(items), segment.buffer, stream_seed(seed, epoch, p, w, generation))",
        "order = emission_order(len(items), 1, stream_seed(seed, epoch, p, w, generation))",
        (T_RESHAPE, T_RESHAPE_LOADER),
    ),
    Mutant(
        "pseudonym-without-the-key",
        PSEUDONYM,
        "return PSEUDONYM_PREFIX + self._mac(_ID_DOMAIN, patient_id)[:_PSEUDONYM_HEX]",
        "return PSEUDONYM_PREFIX + hashlib.sha256(patient_id.encode()).hexdigest()[:_PSEUDONYM_HEX]",
        (T_PSEUDO,),
    ),
    Mutant(
        "pseudonym-shares-the-option-domain",
        PSEUDONYM,
        "return PSEUDONYM_PREFIX + self._mac(_ID_DOMAIN, patient_id)[:_PSEUDONYM_HEX]",
        "return PSEUDONYM_PREFIX + self._mac(_OPTION_DOMAIN, patient_id)[:_PSEUDONYM_HEX]",
        (
            f"{T_PSEUDO}::test_a_pseudonym_cannot_be_matched_to_a_digest_of_the_same_text_elsewhere_in_the_set",
        ),
    ),
    Mutant(
        "runlock-another-hosts-lock-never-goes-stale",
        RUNLOCK,
        "    if age > STALE_AFTER_S:",
        "    if False:",
        (T_LOCK_HOST,),
    ),
    Mutant(
        "runlock-reused-pid-still-holds-the-lock",
        RUNLOCK,
        "if holder.proc_start is not None and current is not None and current != holder.proc_start:",
        "if False:",
        (T_LOCK_PID,),
    ),
    Mutant(
        "duplicate-mask-ignores-the-rank-offset",
        LOSS,
        "same[rows, rows + offset] = False",
        "same[rows, rows] = False",
        (T_DUP_RANKS,),
    ),
    Mutant(
        "logit-scale-clamp-above-the-cap",
        RETCLIP,
        "scale.clamp_(min=self.config.min_logit_scale, max=self.config.max_logit_scale)",
        "scale.clamp_(min=self.config.min_logit_scale, max=self.config.max_logit_scale + 1.0)",
        (T_CLAMP_STEP, "tests/test_model.py::test_clamp_logit_scales"),
    ),
    Mutant(
        "trainer-step-skips-the-clamp",
        BACKEND,
        "    if not uses_deepspeed(acc):\n        inner.clamp_logit_scales_()\n        return\n",
        "    if not uses_deepspeed(acc):\n        return\n",
        (T_CLAMP_STEP,),
    ),
    Mutant(
        "preflight-lets-another-image-size-through",
        PREFLIGHT,
        "if cfg.data.image_size is not None and side != cfg.data.image_size:",
        "if False:",
        (T_PREFLIGHT,),
    ),
    Mutant(
        "preflight-skips-the-data-position-check",
        PREFLIGHT,
        "    reason = position.refusal(first, now)\n",
        "    reason = None\n",
        (T_PREFLIGHT_RESUME,),
    ),
]


def _copy_tree(dest: Path) -> None:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)
    # A mutant of one run must never be read back from a stale bytecode cache of another.
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"


def _pytest(tree: Path, tests: list[str], timeout_s: float = TIMEOUT_S) -> tuple[int, float, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-W", "ignore", *tests]
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return TIMED_OUT, time.monotonic() - start, f"no result within {timeout_s:.0f} s"
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    summary = lines[-1] if lines else done.stderr[-200:]
    # The first error line says why a mutant was caught (an assertion, not a crash of the mutant itself).
    why = next((ln[1:].strip() for ln in lines if ln.startswith("E ")), "")
    return done.returncode, time.monotonic() - start, f"{summary}; {why[:90]}" if why else summary


def verdict(code: int) -> str:
    """The mutant's verdict from pytest's exit status (or TIMED_OUT)."""
    if code == TIMED_OUT:
        return "timed out"
    if code == 0:
        return "survived"
    if code == 1:  # pytest: tests were collected and run, and some failed
        return "caught"
    return "crashed"  # 2 interrupted or a collection error, 3 internal error, 4 usage, 5 no tests, < 0 signal


def run(mutants: list[Mutant], baseline: bool, timeout_s: float = TIMEOUT_S) -> int:
    began = time.monotonic()
    results: list[tuple[Mutant, str, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="retclip-mutants-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        if baseline:
            tests = sorted({t for m in mutants for t in m.tests})
            code, secs, last = _pytest(tree, tests, timeout_s)
            print(f"baseline ({len(tests)} test selections): exit {code} in {secs:.0f} s: {last}", flush=True)
            if code != 0:
                print("the unmutated tests fail; no mutant can be judged", file=sys.stderr)
                return 1
        for m in mutants:
            target = tree / m.path
            text = target.read_text(encoding="utf-8")
            if text.count(m.original) != 1:
                results.append((m, "stale", 0.0, f"snippet found {text.count(m.original)} times"))
                print(f"{'stale':9} {m.name}", flush=True)
                continue
            try:
                target.write_text(text.replace(m.original, m.mutated), encoding="utf-8")
                code, secs, last = _pytest(tree, list(m.tests), timeout_s)
            finally:
                target.write_text(text, encoding="utf-8")
            found = verdict(code)
            results.append((m, found, secs, last))
            print(f"{found:9} {m.name} ({secs:.0f} s): {last}", flush=True)

    print("\n| mutant | file | verdict | tests | note |\n|---|---|---|---|---|")
    for m, found, _, last in results:
        note = (m.expect_survive if found == "survived" else last).replace("|", "/")
        tests = ", ".join(dict.fromkeys(t.replace("tests/", "").split("::")[0] for t in m.tests))
        print(f"| {m.name} | {m.path.removeprefix('retclip_dist/')} | {found} | {tests} | {note} |")
    counts = {v: sum(r[1] == v for r in results) for v in VERDICTS}
    print(
        "\n" + ", ".join(f"{n} {v}" for v, n in counts.items()) + f" in {time.monotonic() - began:.0f} s",
        flush=True,
    )
    unexpected = [m.name for m, v, _, _ in results if v == "survived" and not m.expect_survive]
    if unexpected:
        print(f"survivors without an explanation: {unexpected}", file=sys.stderr)
    unjudged = [m.name for m, v, _, _ in results if v in ("timed out", "crashed")]
    if unjudged:
        print(f"not judged (timed out or crashed): {unjudged}", file=sys.stderr)
    return 1 if unexpected or unjudged else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="run mutants whose name contains this")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    parser.add_argument("--slow", action="store_true", help="also mutants whose tests are marked slow")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    # The slow resume test alone takes ~4 min on 2 cores shared at load 7: past the default limit.
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds each pytest run may take")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.only or any(s in m.name for s in args.only)]
    chosen = [m for m in chosen if args.slow or not m.slow]
    if args.list:
        for m in chosen:
            print(f"{m.name:50} {m.path}  ->  {' '.join(m.tests)}")
        return 0
    return run(chosen, baseline=not args.no_baseline, timeout_s=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
