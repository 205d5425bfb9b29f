"""Every claim in the README's "Where epochal differs from transformers" list has tests that show it.

Each bullet of that section is keyed by its opening words; the tests listed for it must
exist. A new bullet without tests, or a renamed test, fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE_TESTS = "packages/epochal-core/tests"

#: Opening words of a bullet -> "file::test" that show the claim.
CLAIMS: dict[str, list[str]] = {
    "Integrations cannot kill a run": [
        f"{CORE_TESTS}/test_plumbing.py::test_failing_integration_is_disabled_and_training_finishes",
        f"{CORE_TESTS}/test_plumbing.py::test_strict_mode_surfaces_integration_errors",
        "tests/test_end_to_end.py::test_one_tracker_failing_mid_run_leaves_training_and_the_others_intact",
    ],
    "Logging is cheap on the hot path": [
        f"{CORE_TESTS}/test_plumbing.py::test_slow_integration_does_not_block_training",
        f"{CORE_TESTS}/test_plumbing.py::test_full_queue_makes_training_wait_and_drops_nothing",
    ],
    "Only overridden events are dispatched": [
        f"{CORE_TESTS}/test_protocol.py::test_handler_dispatches_only_overridden_events",
    ],
    "The loss stays on the device": [
        f"{CORE_TESTS}/test_trainer_loop.py::test_device_is_read_only_when_a_log_is_due",
        f"{CORE_TESTS}/test_trainer_loop.py::test_cpu_guard_sums_on_the_host_with_the_same_logs",
    ],
    "Checkpoints are atomic and checked": [
        f"{CORE_TESTS}/test_checkpoints.py::test_sigkill_at_many_points_always_resumes",
        f"{CORE_TESTS}/test_checkpoints.py::test_resume_ignores_and_reports_incomplete_checkpoints",
        f"{CORE_TESTS}/test_checkpoints.py::test_manifest_records_each_files_checksum_as_written",
        f"{CORE_TESTS}/test_checkpoints.py::test_file_changed_after_the_save_is_refused_naming_it",
        f"{CORE_TESTS}/test_checkpoints.py::test_tampered_checkpoint_fails_safely_naming_the_file",
    ],
    "`log_history` costs the same at every checkpoint": [
        f"{CORE_TESTS}/test_checkpoints.py::test_log_history_is_stored_once_and_restored_whole",
        f"{CORE_TESTS}/test_checkpoints.py::test_checkpoint_without_its_log_history_file_resumes_with_the_tail",
    ],
    "Callback state is restored by default": [
        f"{CORE_TESTS}/test_checkpoints.py::test_callback_states_are_restored_per_instance_in_order",
        f"{CORE_TESTS}/test_checkpoints.py::test_stopped_run_stays_stopped_and_finished_run_can_be_extended",
        f"{CORE_TESTS}/test_field_failures.py::test_resuming_a_finished_run_with_the_same_max_steps_trains_no_step_and_writes_no_checkpoint",
    ],
    "SIGTERM / first Ctrl-C": [
        f"{CORE_TESTS}/test_checkpoints.py::test_sigterm_saves_at_the_step_boundary_and_exits_cleanly",
        f"{CORE_TESTS}/test_checkpoints.py::test_first_sigint_stops_gracefully_and_second_aborts",
        f"{CORE_TESTS}/test_plumbing.py::test_crash_finishes_integrations_as_failed_and_reraises_unchanged",
    ],
    "Non-finite loss or gradient norm": [
        f"{CORE_TESTS}/test_checkpoints.py::test_nonfinite_loss_never_reaches_the_weights",
    ],
    "Values are never rounded": [
        f"{CORE_TESTS}/test_trainer_loop.py::test_log_keys_and_values_match_transformers",
        f"{CORE_TESTS}/test_protocol.py::test_printer_does_not_mutate_logs",
    ],
    "Console lines are written in groups when logs come fast": [
        f"{CORE_TESTS}/test_protocol.py::test_printer_holds_fast_lines_until_slow_work_or_the_end",
        f"{CORE_TESTS}/test_protocol.py::test_printer_writes_held_lines_once_the_interval_passes",
        f"{CORE_TESTS}/test_trainer_loop.py::test_console_prints_every_log_line_once_and_in_order",
    ],
    "transformers and PEFT models save as their users expect": [
        f"{CORE_TESTS}/test_pretrained_models.py::test_gpt2_save_model_opens_with_from_pretrained",
        f"{CORE_TESTS}/test_pretrained_models.py::test_gpt2_checkpoint_is_the_library_format_in_the_manifest",
        f"{CORE_TESTS}/test_pretrained_models.py::test_lora_checkpoint_holds_the_adapter_not_the_base",
        f"{CORE_TESTS}/test_pretrained_models.py::test_lora_best_model_and_bit_exact_resume",
        f"{CORE_TESTS}/test_pretrained_models.py::test_core_import_and_a_plain_run_load_neither_library",
    ],
    "No integration can hold a run hostage": [
        f"{CORE_TESTS}/test_field_failures.py::test_a_tracker_stalled_from_step_5_is_detached_and_the_step_10_checkpoint_is_still_written",
        f"{CORE_TESTS}/test_field_failures.py::test_a_tracker_stalled_closing_its_run_does_not_hold_the_end_of_training",
        f"{CORE_TESTS}/test_field_failures.py::test_strict_mode_raises_on_a_stalled_tracker",
        f"{CORE_TESTS}/test_field_failures.py::test_sigterm_with_a_stalled_tracker_still_saves_and_exits_normally",
    ],
    "A full disk is named as one": [
        f"{CORE_TESTS}/test_field_failures.py::test_a_file_size_limit_during_a_save_names_it_removes_the_partial_folder_and_resume_works",
        f"{CORE_TESTS}/test_field_failures.py::test_enospc_on_a_small_filesystem_names_the_sizes_warns_before_and_resumes_after_making_room",
    ],
    "One run per `output_dir`": [
        f"{CORE_TESTS}/test_field_failures.py::test_a_second_trainer_is_refused_while_another_process_trains_and_a_sigkilled_one_frees_the_folder",
        f"{CORE_TESTS}/test_field_failures.py::test_a_live_runs_folder_refuses_train_but_not_evaluate_predict_or_a_later_resume",
        f"{CORE_TESTS}/test_field_failures.py::test_the_lock_dies_with_a_sigkilled_holder",
    ],
    "`remove_callback` never raises": [
        f"{CORE_TESTS}/test_protocol.py::test_add_pop_remove_by_class_and_instance",
        f"{CORE_TESTS}/test_plumbing.py::test_third_party_package_adds_a_report_to_name_with_one_entry_point",
    ],
    "`TrainingArguments` rejects inconsistent values": [
        f"{CORE_TESTS}/test_training_args.py::test_bad_value_is_rejected_naming_field_value_and_fix",
        f"{CORE_TESTS}/test_training_args.py::test_every_value_error_path_is_exercised",
        f"{CORE_TESTS}/test_parity_args.py::test_wrong_type_names_the_field",
        f"{CORE_TESTS}/test_parity_args.py::test_transformers_field_epochal_lacks_names_the_alternative",
        f"{CORE_TESTS}/test_parity_args.py::test_no_effect_fields_are_accepted_with_one_warning",
    ],
    "A run a callback stops early is checkpointed": [
        f"{CORE_TESTS}/test_checkpoints.py::test_stopped_run_stays_stopped_and_finished_run_can_be_extended",
    ],
    "A checkpoint written by transformers' Trainer resumes only by its explicit path": [
        f"{CORE_TESTS}/test_parity_trainer.py::test_resume_a_checkpoint_written_by_transformers_with_one_warning",
    ],
    "Porting a transformers script": [
        f"{CORE_TESTS}/test_parity_eval.py::test_compute_metrics_gets_numpy_and_numpy_scalars_become_python_floats",
        f"{CORE_TESTS}/test_parity_trainer.py::test_run_glue_epilogue_log_metrics_save_metrics_save_state",
    ],
}


def readme_claims() -> list[str]:
    """The bullets of the README's differences section, as their first line."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Where epochal differs from transformers", 1)[1].split("\n## ", 1)[0]
    return [line[2:] for line in section.splitlines() if line.startswith("- ")]


def test_every_readme_claim_is_listed_here() -> None:
    bullets = readme_claims()
    assert len(bullets) >= 10
    unlisted = [b for b in bullets if not any(b.replace("**", "").startswith(key) for key in CLAIMS)]
    assert unlisted == [], "README claims without tests: add them to CLAIMS"
    stale = [key for key in CLAIMS if not any(b.replace("**", "").startswith(key) for b in bullets)]
    assert stale == [], "CLAIMS keys no longer in the README"


def test_every_listed_test_exists() -> None:
    missing = []
    for tests in CLAIMS.values():
        assert tests
        for node in tests:
            path, name = node.split("::")
            source = (ROOT / path).read_text(encoding="utf-8")
            if not re.search(rf"^def {name}\(", source, re.MULTILINE):
                missing.append(node)
    assert missing == []
