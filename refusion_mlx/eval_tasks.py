"""``python -m refusion_mlx.evaluate --tasks ...``: lm-evaluation-harness tasks for each decoder
of the same weights, in one command, and one table of accuracy beside speed.

lm-eval (the ``eval`` extra) is imported only here and only once the arguments are checked:
the base install never needs it. The model is loaded once; each decoder gets its own
``lm_eval_model.RefusionLM`` over it and its own ``simple_evaluate`` run. Tasks scored only by
log-likelihoods (multiple choice, perplexity) do not depend on the decoder and run once.
"""

import argparse
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from .batch import DECODERS, LEFT_TO_RIGHT, PLAN_AND_INFILL
from .errors import RefusionError

if TYPE_CHECKING:  # lm_eval_model imports lm-eval: only once the arguments are checked
    from .lm_eval_model import Usage

MISSING = "--tasks needs lm-evaluation-harness: pip install 'refusion-mlx[eval]' (or pip install 'lm-eval>=0.4.10')"
BOTH = "both"
ANY = "(any)"  # the decoder column of a task scored by log-likelihoods alone
GENERATIVE = "generate_until"


def add_task_flags(parser: argparse.ArgumentParser):
    """The flags of the ``--tasks`` mode (lm-eval's usual ones, and the decoder's)."""
    from .presets import PRESETS

    group = parser.add_argument_group("lm-evaluation-harness tasks (the eval extra)")
    group.add_argument("--tasks", help="comma-separated lm-eval task names (e.g. gsm8k_cot,arc_challenge_chat); "
                                       "runs lm-evaluation-harness instead of the demo evaluation")
    group.add_argument("--decoder", choices=[*DECODERS, BOTH], default=BOTH,
                       help="plan-and-infill, left-to-right (the baseline on the same weights), or both "
                            "with their speed ratio (default)")
    group.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: the task's)")
    group.add_argument("--include-path", help="folder of extra task YAML files")
    group.add_argument("--output-path", help="folder for lm-eval's JSON results (one subfolder per decoder)")
    group.add_argument("--apply-chat-template", action="store_true",
                       help="prompts through the model's chat template (thinking on), as upstream evaluates")
    group.add_argument("--log-samples", action="store_true", help="with --output-path: every sample's output too")
    group.add_argument("--confirm-run-unsafe-code", action="store_true",
                       help="let tasks run the generated code (HumanEval, MBPP need it; lm-eval's flag)")
    group.add_argument("--preset", default="auto", choices=["auto", "none", *sorted(PRESETS)],
                       help="the paper's knobs: by task name (auto, default), none, or one for every task")
    group.add_argument("--slot-size", type=int, help="tokens per slot (over the preset's)")
    group.add_argument("--blocks", type=int, help="serial blocks (over the preset's)")
    group.add_argument("--slot-threshold", type=float, help="slot threshold (over the preset's)")
    group.add_argument("--token-threshold", type=float, help="token threshold (over the preset's)")
    group.add_argument("--batch-size", type=int, default=8,
                       help="prompts decoded (or requests scored) together (default 8)")


def model_kwargs(args) -> dict:
    """``RefusionLM``'s knobs from the flags."""
    return dict(preset=args.preset, max_tokens=args.max_tokens, slot_size=args.slot_size, blocks=args.blocks,
                slot_threshold=args.slot_threshold, token_threshold=args.token_threshold,
                batch_size=args.batch_size)


def check_task_args(args):
    """Refuse what cannot work before lm-eval is imported or anything is loaded."""
    from .cli import in_flag_names
    from .decode import settings_for

    names = task_names(args.tasks)
    if args.data is not None or args.settings is not None:
        raise RefusionError(f"{'--data' if args.data is not None else '--settings'} is for the demo evaluation; "
                            "it does not apply with --tasks")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise RefusionError(f"--num-fewshot must be at least 0, got {args.num_fewshot}")
    if args.batch_size < 1:
        raise RefusionError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.include_path is not None and not Path(args.include_path).expanduser().exists():
        raise RefusionError(f"--include-path: no such folder {args.include_path}")
    if args.output_path is not None and not Path(args.output_path).expanduser().resolve().parent.is_dir():
        raise RefusionError(f"--output-path: no folder {Path(args.output_path).parent}")
    if args.log_samples and args.output_path is None:
        raise RefusionError("--log-samples needs --output-path")
    knobs = dict(gen_length=args.max_tokens, slot_size=args.slot_size, serial_num_blocks=args.blocks,
                 slot_threshold=args.slot_threshold, token_threshold=args.token_threshold)
    try:
        settings_for(None, **knobs)
    except RefusionError as e:
        raise RefusionError(in_flag_names(str(e))) from None
    return names


def task_names(text: str) -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise RefusionError("--tasks names no task")
    return names


def require_lm_eval():
    """Import lm-eval, or the one-line error saying how to install it."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise RefusionError(MISSING) from None


def task_manager(names: Sequence[str], include_path: Optional[str]):
    """lm-eval's TaskManager for ``names``; an unknown name is one line.

    Names all found in ``--include-path`` are resolved there alone (local files override the
    built-in tasks anyway), which spares indexing lm-eval's thousands of built-in task files.
    """
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=str(Path(include_path).expanduser()), include_defaults=False)
        if all(local.match_tasks([n]) for n in names):
            return local
    manager = TaskManager(include_path=str(Path(include_path).expanduser()) if include_path else None)
    unknown = [n for n in names if not manager.match_tasks([n])]
    if unknown:
        raise RefusionError(f"unknown task {unknown[0]!r}: lm-eval has no task, group or tag of that name "
                            "(`lm-eval ls tasks` lists them; local task files go in --include-path)")
    return manager


@dataclass
class Row:
    """One task evaluated by one decoder."""

    task: str
    decoder: str
    metric: str
    accuracy: float
    usage: "Usage"
    generative: bool

    @property
    def tokens_per_second(self) -> float:
        return self.usage.tokens_per_second


@dataclass
class Run:
    """One decoder's ``simple_evaluate``: its results and what each task cost."""

    decoder: str
    names: List[str]
    results: dict
    usage: Dict[Optional[str], "Usage"] = field(default_factory=dict)
    seconds: float = 0.0


def primary_metric(task_results: dict) -> Optional[Tuple[str, float]]:
    """The first metric lm-eval reports for a task (its main one), e.g. ("exact_match,strict-match", 0.8).

    Metrics are keyed "metric,filter"; other keys (alias, sample_len) are not metrics.
    """
    for key, value in task_results.items():
        if "," in key and "_stderr" not in key and isinstance(value, (int, float)) and not isinstance(value, bool):
            return key, float(value)
    return None


def leaves(results: dict, name: str) -> List[str]:
    """The tasks under a group (recursively), or the task itself."""
    subtasks = results.get("group_subtasks", {}).get(name)
    if not subtasks:
        return [name]
    return [leaf for sub in subtasks for leaf in leaves(results, sub)]


def summed_usage(run: Run, names: Sequence[str]) -> "Usage":
    """What the named tasks cost together (a group's row: its tasks' sum)."""
    from .lm_eval_model import Usage

    total = Usage()
    for name in names:
        u = run.usage.get(name)
        for f in fields(Usage) if u is not None else ():
            setattr(total, f.name, getattr(total, f.name) + getattr(u, f.name))
    return total


def is_generative(results: dict, name: str) -> bool:
    return any(results.get("configs", {}).get(leaf, {}).get("output_type") == GENERATIVE
               for leaf in leaves(results, name))


def rows_of(run: Run, decoder_label: Optional[str] = None) -> List[Row]:
    """A row per task and group lm-eval reported, in its order."""
    rows = []
    for name, task_results in run.results["results"].items():
        metric = primary_metric(task_results)
        if metric is None:
            continue
        generative = is_generative(run.results, name)
        rows.append(Row(name, decoder_label or (run.decoder if generative else ANY), metric[0], metric[1],
                        summed_usage(run, leaves(run.results, name)), generative))
    return rows


def format_markdown(rows: Sequence[Row]) -> str:
    """The results table: accuracy beside speed, and each plan-and-infill row's speed and accuracy
    next to left to right's on the same task."""
    base = {r.task: r for r in rows if r.decoder == LEFT_TO_RIGHT}
    lines = ["| # | task | decoder | metric | accuracy | tokens/s | tokens/call | model calls | tokens "
             "| wall s | speed vs left-to-right | accuracy vs left-to-right |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in enumerate(rows):
        u = r.usage
        speed = compare = "—"
        ref = base.get(r.task)
        if r.generative and ref is not None and r.decoder != LEFT_TO_RIGHT and ref.tokens_per_second > 0:
            speed = f"{r.tokens_per_second / ref.tokens_per_second:.2f}x"
            compare = f"{100 * (r.accuracy - ref.accuracy):+.1f} pts"
        lines.append(
            f"| {k} | {r.task} | {r.decoder} | {r.metric} | {100 * r.accuracy:.1f}% "
            f"| {f'{u.tokens_per_second:.1f}' if r.generative else '—'} "
            f"| {f'{u.tokens_per_call:.2f}' if r.generative else '—'} "
            f"| {u.model_calls if r.generative else u.forwards} | {u.tokens if r.generative else u.scored_tokens} "
            f"| {u.seconds:.2f} | {speed} | {compare} |")
    return "\n".join(lines)


def plot_rows(rows: Sequence[Row], path: str):
    """Speed against accuracy of the generative rows (numbers: table rows; red: left to right)."""
    from .plot import save_figure

    points = [(str(k), r.tokens_per_second, 100 * r.accuracy, r.decoder == LEFT_TO_RIGHT)
              for k, r in enumerate(rows) if r.generative]
    if not points:
        return None
    save_figure(points, path, "--plot")
    return path


def evaluate_decoder(lm, names: Sequence[str], manager, args) -> Run:
    """One ``simple_evaluate`` of ``names`` by ``lm``; lm-eval's JSON written under --output-path."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    tracker = None
    if args.output_path:
        tracker = EvaluationTracker(output_path=str(Path(args.output_path).expanduser() / lm.decoder))
    seeds = {} if args.seed is None else dict(random_seed=args.seed, numpy_random_seed=args.seed,
                                               torch_random_seed=args.seed, fewshot_random_seed=args.seed)
    tic = time.perf_counter()
    # model_args only names the run in lm-eval's results (and its output folder): lm is built already.
    results = simple_evaluate(model=lm, model_args={"model": lm.model_name, "decoder": lm.decoder},
                              tasks=list(names), num_fewshot=args.num_fewshot, limit=args.limit,
                              task_manager=manager, apply_chat_template=args.apply_chat_template,
                              fewshot_as_multiturn=args.apply_chat_template, log_samples=args.log_samples,
                              evaluation_tracker=tracker, confirm_run_unsafe_code=args.confirm_run_unsafe_code,
                              **seeds)
    seconds = time.perf_counter() - tic
    if tracker is not None:
        samples = results.pop("samples", None)
        tracker.save_results_aggregated(results=results, samples=samples)
        for task in (samples or {}):
            tracker.save_results_samples(task_name=task, samples=samples[task])
    return Run(lm.decoder, list(names), results, dict(lm.usage), seconds)


def run_tasks(args) -> int:
    """Check, load once, evaluate each decoder, print the table (and plot)."""
    from .plot import check_matplotlib

    names = check_task_args(args)
    if args.plot is not None:
        check_matplotlib()
    require_lm_eval()
    from .loading import load
    from .lm_eval_model import RefusionLM

    manager = task_manager(names, args.include_path)
    model, tokenizer = load(args.model, adapter_path=args.adapter_path, dtype=args.dtype)
    decoders = [LEFT_TO_RIGHT, PLAN_AND_INFILL] if args.decoder == BOTH else [args.decoder]
    print(f"model: {args.model or 'demo'}  tasks: {', '.join(names)}  decoders: {', '.join(decoders)}  "
          f"limit: {args.limit}  greedy", flush=True)
    runs: List[Run] = []
    todo = list(names)
    for decoder in decoders:
        lm = RefusionLM(model=model, tokenizer=tokenizer, decoder=decoder, **model_kwargs(args))
        lm.model_name = args.model or "demo"
        runs.append(evaluate_decoder(lm, todo, manager, args))
        # Log-likelihood tasks score the same whatever the decoder: the next decoder skips them.
        todo = [n for n in todo if is_generative(runs[-1].results, n)]
        if not todo:
            break
    rows = [row for run in runs for row in rows_of(run)]
    print(format_markdown(rows))
    print("wall time: " + ", ".join(f"{run.decoder} {run.seconds:.1f} s" for run in runs))
    if args.output_path:
        print(f"lm-eval results: {args.output_path}/<decoder>/")
    if args.plot and plot_rows(rows, args.plot):
        print(f"plot: {args.plot}")
    return 0
