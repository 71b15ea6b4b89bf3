"""Batch tab: run many prompts against several models at once, with live progress and results.

Stable CSS classes (hooks for UI tests):
- ``sqllm-batch-prompts``      text area, one prompt per line
- ``sqllm-batch-file``         file upload (.txt, .csv, .jsonl; UPLOAD_MAX_BYTES / _PROMPTS)
- ``sqllm-batch-source``       which prompts will be used (pasted or the uploaded file)
- ``sqllm-batch-targets``      "provider:model" targets (several at once)
- ``sqllm-batch-add-target``   free-text "provider:model" input, with ``sqllm-batch-add`` button
- ``sqllm-batch-samples``, ``sqllm-batch-concurrency``  numbers
- ``sqllm-batch-start``        Start (disabled while a batch runs)
- ``sqllm-batch-cancel``       Cancel (enabled while a batch runs)
- ``sqllm-batch-progress``     progress bar, value 0..100
- ``sqllm-batch-status``       counts line: while running "Batch #id: done/total done ·
                               succeeded · failed · retrying · in flight · ETA"; at the end
                               "Batch #id finished|cancelled|stopped: run/total run · ..."
- ``sqllm-batch-results``      results table (position, prompt, target, sample, status,
                               call id, answer preview), filled as items finish
- ``sqllm-batch-resumable``    interrupted or cancelled jobs, with ``sqllm-batch-resume``
- ``sqllm-batch-matrix``       prompts × targets answers, shown when a batch finishes
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pandas as pd
import panel as pn
import param

from study_query_llm.services.jobs import BatchProgress, ItemOutcome, Target
from study_query_llm.services.prompt_files import SUPPORTED, parse_prompts, size_text

from ..export import download_buttons
from ..safe import escape
from ..state import AppState, describe_error, notify
from .inference import USER_ERRORS, chat_providers, check_model_name, is_mock, list_model_ids

log = logging.getLogger(__name__)

MAX_ITEMS = 250_000
PREVIEW_CHARS = 160
TICK_S = 0.4  # how often the progress bar, counts and table are refreshed
RECORDED_EVERY_S = 5.0  # how often other tabs are told about new calls during a batch
RESULTS_SHOWN = 5_000  # newest result rows kept in the table
RESULT_COLUMNS = ["position", "prompt", "target", "sample", "status", "call id", "answer"]


def _preview(text: object) -> str:
    flat = " ".join(str(text or "").split())
    return flat if len(flat) <= PREVIEW_CHARS else flat[: PREVIEW_CHARS - 1] + "…"


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "ETA —"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"ETA {seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"ETA {minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"ETA {hours} h {minutes:02d} min"


def outcome_row(outcome: ItemOutcome) -> dict[str, Any]:
    """One results-table row for a finished item (plain text; the table escapes it)."""
    item, result = outcome.item, outcome.result
    if result is not None and result.ok:
        answer = _preview(result.text)
    elif result is not None and result.error is not None:
        answer = f"({result.status}: {describe_error(result.error)})"
    elif outcome.error is not None:
        answer = f"(not run: {describe_error(outcome.error)})"
    else:
        answer = f"({outcome.status})"
    target = f"{item.provider}:{item.model}" + (" (mock)" if is_mock(item.provider) else "")
    return {
        "position": item.position,
        "prompt": _preview(item.prompt),
        "target": target,
        "sample": item.sample_index + 1,
        "status": outcome.status + (" (superseded)" if outcome.superseded else ""),
        "answer": answer,
        "call id": result.call_id if result is not None and result.call_ids else "",
    }


def resumable(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Jobs that have items left to run: interrupted (open items) or cancelled part-way."""
    return [
        job
        for job in jobs
        if job["counts"].open > 0 or (job["status"] == "cancelled" and job["counts"].cancelled)
    ]


class BatchView(pn.viewable.Viewer):
    """Prompts × targets × samples as a resumable job, run in the background of the session."""

    state = param.ClassSelector(class_=AppState, doc="The session state.")
    running = param.Boolean(default=False, doc="Whether this view is running a batch now.")
    job_id = param.Integer(default=None, allow_None=True, doc="The job shown (running or last).")

    def __init__(self, **params):
        super().__init__(**params)
        settings = self.state.services.settings
        self._max_bytes = settings.upload_max_bytes  # UPLOAD_MAX_BYTES
        self._max_prompts = settings.upload_max_prompts  # UPLOAD_MAX_PROMPTS
        self._providers = list(chat_providers(settings).values())
        self._task: asyncio.Task | None = None
        self._progress_seen: BatchProgress | None = None
        self._rows: list[dict[str, Any]] = []
        self._file_prompts: list[str] | None = None
        self._group_id: int | None = None
        self._in_run = False  # the background task is inside run_job (cancel may interrupt)
        self._active_job: int | None = None  # being run by this view: not offered to resume
        self._cancel_requested = False

        self._prompts = pn.widgets.TextAreaInput(
            name="Prompts (one per line)",
            placeholder="What is the boiling point of water?\nName three prime numbers.",
            rows=6,
            sizing_mode="stretch_width",
            max_length=self._max_bytes,  # UPLOAD_MAX_BYTES, as for a file
            css_classes=["sqllm-batch-prompts"],
        )
        self._file = pn.widgets.FileInput(
            accept=",".join(SUPPORTED),
            multiple=False,
            css_classes=["sqllm-batch-file"],
        )
        self._source = pn.pane.HTML("Using the pasted prompts.", css_classes=["sqllm-batch-source"])
        self._use_pasted = pn.widgets.Button(
            name="Use pasted prompts",
            visible=False,
            width=170,
            css_classes=["sqllm-batch-use-pasted"],
        )
        self._targets = pn.widgets.MultiChoice(
            name="Targets (provider:model)",
            options=[],
            value=[],
            placeholder="choose one or more",
            sizing_mode="stretch_width",
            css_classes=["sqllm-batch-targets"],
        )
        self._new_target = pn.widgets.TextInput(
            name="Add a target",
            placeholder="provider:model",
            width=240,
            css_classes=["sqllm-batch-add-target"],
        )
        self._add = pn.widgets.Button(
            name="Add", width=80, align="end", css_classes=["sqllm-batch-add"]
        )
        self._samples = pn.widgets.IntInput(
            name="Samples per prompt",
            value=1,
            start=1,
            end=20,
            width=140,
            css_classes=["sqllm-batch-samples"],
        )
        self._concurrency = pn.widgets.IntInput(
            name="Concurrency",
            value=8,
            start=1,
            end=64,
            width=120,
            css_classes=["sqllm-batch-concurrency"],
        )
        self._temperature = pn.widgets.FloatInput(
            name="Temperature",
            value=None,
            start=0.0,
            end=2.0,
            step=0.1,
            placeholder="default",
            width=120,
            css_classes=["sqllm-batch-temperature"],
        )
        self._name = pn.widgets.TextInput(
            name="Batch name (optional)",
            placeholder="batch <date time>",
            width=260,
            css_classes=["sqllm-batch-name"],
        )
        self._start = pn.widgets.Button(
            name="Start batch",
            button_type="primary",
            width=140,
            css_classes=["sqllm-batch-start"],
        )
        self._cancel = pn.widgets.Button(
            name="Cancel",
            button_type="warning",
            width=100,
            disabled=True,
            css_classes=["sqllm-batch-cancel"],
        )
        self._progress = pn.indicators.Progress(
            value=0,
            max=100,
            bar_color="primary",
            sizing_mode="stretch_width",
            css_classes=["sqllm-batch-progress"],
        )
        self._status = pn.pane.HTML(
            "No batch running.", sizing_mode="stretch_width", css_classes=["sqllm-batch-status"]
        )
        self._results = pn.widgets.Tabulator(
            pd.DataFrame(columns=RESULT_COLUMNS),
            disabled=True,
            show_index=False,
            pagination="local",
            page_size=20,
            sizing_mode="stretch_width",
            layout="fit_data_fill",
            css_classes=["sqllm-batch-results"],
        )
        self._jobs = pn.widgets.Select(
            name="Interrupted or cancelled batches",
            options={},
            width=420,
            css_classes=["sqllm-batch-resumable"],
        )
        self._resume = pn.widgets.Button(
            name="Resume",
            width=100,
            align="end",
            disabled=True,
            css_classes=["sqllm-batch-resume"],
        )
        self._refresh_jobs = pn.widgets.Button(
            name="Refresh list", width=110, align="end", css_classes=["sqllm-batch-refresh"]
        )
        self._matrix = pn.widgets.Tabulator(
            pd.DataFrame(columns=["prompt"]),
            disabled=True,
            show_index=False,
            pagination="remote",
            page_size=20,
            sizing_mode="stretch_width",
            layout="fit_data_fill",
            css_classes=["sqllm-batch-matrix"],
        )
        self._matrix_frame: pd.DataFrame | None = None
        self._matrix_box = pn.Column(
            pn.pane.Markdown("#### Matrix: prompts × targets (first sample's answer)"),
            self._matrix,
            download_buttons(lambda: self._matrix_frame, "batch-matrix"),
            visible=False,
            sizing_mode="stretch_width",
        )

        self._file.param.watch(self._on_file, "value")
        self._use_pasted.on_click(self._on_use_pasted)
        self._add.on_click(self._on_add_target)
        self._new_target.param.watch(self._on_add_target, "enter_pressed")
        self._start.on_click(self._on_start)
        self._cancel.on_click(self._on_cancel)
        self._resume.on_click(self._on_resume)
        self._refresh_jobs.on_click(self._load_jobs)
        self._jobs.param.watch(self._sync_buttons, "value")
        if pn.state.curdoc is not None:
            pn.state.onload(self._load)
            pn.state.on_session_destroyed(self._on_session_destroyed)

    def _on_session_destroyed(self, _context) -> None:
        # The page is gone: stop calling. The job keeps its open items and can be resumed.
        if self._task is not None and not self._task.done():
            self._task.cancel()

    # --- first load ------------------------------------------------------------------------

    async def _load(self) -> None:
        await asyncio.gather(self._load_targets(), self._load_jobs())

    async def _load_targets(self) -> None:
        """Targets from every configured chat provider's model list (defaults first)."""
        services = self.state.services
        listed = await asyncio.gather(
            *(list_model_ids(services.inference, services.settings, p) for p in self._providers)
        )
        options: list[str] = []
        default: str | None = None
        for provider_id, (ids, problem) in zip(self._providers, listed, strict=True):
            if problem:
                notify(f"Could not list models: {problem}", "warning")
            for model_id in ids:
                options.append(f"{provider_id}:{model_id}")
            if default is None and ids:
                default = f"{provider_id}:{ids[0]}"
        extra = [t for t in self._targets.value if t not in options]
        self._targets.options = options + extra
        if not self._targets.value and default:
            self._targets.value = [default]

    async def _load_jobs(self, _event=None, *, select: int | None = None) -> None:
        """The jobs that can be resumed; `select` pre-selects one (e.g. the one just stopped)."""
        try:
            jobs = resumable(await self.state.services.batches.list_jobs(limit=100))
        except USER_ERRORS as exc:
            notify(f"Could not list batches: {describe_error(exc)}", "error")
            return
        running = self._active_job
        self._jobs.options = {
            f"#{job['id']} {job['name']} — {job['status']}, "
            f"{job['counts'].succeeded + job['counts'].failed:,}/{job['counts'].total:,} run"
            f", {job['counts'].open + job['counts'].cancelled:,} left": job["id"]
            for job in jobs
            if job["id"] != running
        }
        if select is not None and select in self._jobs.options.values():
            self._jobs.value = select
        self._sync_buttons()

    # --- prompts ---------------------------------------------------------------------------

    async def _on_file(self, event) -> None:
        data, filename = event.new, self._file.filename or "upload.txt"
        if data is None:
            return
        try:
            prompts = await self.state.read(
                parse_prompts,
                data,
                filename,
                max_bytes=self._max_bytes,
                max_prompts=self._max_prompts,
            )
        except ValueError as exc:
            log.info("upload refused", extra={"event": "upload_refused", "bytes": len(data)})
            self._reject_file(describe_error(exc))
            return
        log.info(
            "upload accepted",
            extra={"event": "upload_accepted", "bytes": len(data), "prompts": len(prompts)},
        )
        self._file_prompts = prompts
        self._source.object = (
            f"Using <b>{len(prompts):,}</b> prompts from <b>{escape(filename)}</b> "
            "(the pasted prompts are ignored)."
        )
        self._use_pasted.visible = True
        notify(f"{filename}: {len(prompts):,} prompts loaded", "success")

    def _reject_file(self, message: str) -> None:
        self._file_prompts = None
        self._use_pasted.visible = False
        self._source.object = (
            f'<span style="color:#b00020">{escape(message)}</span> Using the pasted prompts.'
        )
        notify(message, "error")

    def _on_use_pasted(self, _event=None) -> None:
        self._file_prompts = None
        self._use_pasted.visible = False
        self._source.object = "Using the pasted prompts."

    def _prompt_list(self) -> list[str]:
        if self._file_prompts is not None:
            return self._file_prompts
        return [line.strip() for line in (self._prompts.value or "").splitlines() if line.strip()]

    def _on_add_target(self, _event=None) -> None:
        text = (self._new_target.value or "").strip()
        if not text:
            return
        try:
            target = Target.parse(text)
        except ValueError as exc:
            notify(describe_error(exc), "error")
            return
        if target.provider not in self._providers:
            notify(
                f"{target.provider!r} is not a configured chat provider; "
                f"choose one of {', '.join(self._providers)}",
                "error",
            )
            return
        try:
            check_model_name(target.model)
        except ValueError as exc:
            notify(describe_error(exc), "error")
            return
        key = f"{target.provider}:{target.model}"
        if key not in self._targets.options:
            self._targets.options = [*self._targets.options, key]
        if key not in self._targets.value:
            self._targets.value = [*self._targets.value, key]
        self._new_target.value = ""

    # --- running ---------------------------------------------------------------------------

    @param.depends("running", watch=True)
    def _sync_buttons(self, *_events) -> None:
        self._start.disabled = self.running
        # Cancel needs the running task: not while the job is still being created.
        self._cancel.disabled = not self.running or self._task is None
        self._resume.disabled = self.running or self._jobs.value is None

    async def _on_start(self, _event=None) -> None:
        if self.running:
            return
        prompts = self._prompt_list()
        if not prompts:
            notify("Paste some prompts (one per line) or upload a file first.", "error")
            return
        if len(prompts) > self._max_prompts:
            notify(
                f"{len(prompts):,} prompts; the limit is {self._max_prompts:,} per batch "
                "(UPLOAD_MAX_PROMPTS).",
                "error",
            )
            return
        if not self._targets.value:
            notify("Choose at least one provider:model target.", "error")
            return
        try:
            targets = [Target.parse(t) for t in self._targets.value]
        except ValueError as exc:
            notify(describe_error(exc), "error")
            return
        n = int(self._samples.value or 1)
        total = len(prompts) * len(targets) * n
        if total > MAX_ITEMS:
            notify(
                f"{total:,} planned calls; the limit is {MAX_ITEMS:,}. Use fewer prompts, "
                "targets or samples.",
                "error",
            )
            return
        options: dict[str, Any] = {}
        if self._temperature.value is not None:
            options["temperature"] = float(self._temperature.value)
        self.running = True  # no double start while the job is created
        self._status.object = f"Creating the job ({total:,} planned calls)…"
        try:
            batches = self.state.services.batches
            job_id = await batches.create_job(
                prompts,
                targets,
                n_samples=n,
                options=options,
                name=(self._name.value or "").strip() or None,
            )
        except USER_ERRORS as exc:
            self.running = False
            self._status.object = f"Not started: {escape(describe_error(exc))}"
            notify(f"Batch not started: {describe_error(exc)}", "error")
            return
        notify(f"Batch #{job_id} created: {total:,} calls", "info")
        await self._launch(job_id)

    async def _on_resume(self, _event=None) -> None:
        job_id = self._jobs.value
        if self.running or job_id is None:
            return
        self.running = True
        try:
            reopened = await self.state.services.batches.reopen(job_id)
            counts = await self.state.services.batches.counts(job_id)
        except USER_ERRORS as exc:
            self.running = False
            notify(f"Could not resume batch #{job_id}: {describe_error(exc)}", "error")
            return
        if counts.open == 0:
            self.running = False
            notify(f"Batch #{job_id} has nothing left to run.", "info")
            await self._load_jobs()
            return
        notify(f"Resuming batch #{job_id}: {counts.open:,} calls left ({reopened:,} reopened)")
        await self._launch(job_id)

    async def _launch(self, job_id: int) -> None:
        """Start running a job in the background; the view keeps the task."""
        try:
            job = await self.state.services.batches.job(job_id)
        except USER_ERRORS as exc:
            self.running = False
            notify(describe_error(exc), "error")
            return
        self.job_id = job_id
        self._group_id = job.get("group_id")
        self._rows = []
        self._results.value = pd.DataFrame(columns=RESULT_COLUMNS)
        self._matrix_box.visible = False
        self._progress.value = 0
        self._progress_seen = None
        self._status.object = f"Batch #{job_id}: starting…"
        self._active_job = job_id
        await self._load_jobs()
        self._cancel_requested = False
        self._task = asyncio.create_task(self._drive(job_id))
        self._sync_buttons()

    def _on_progress(self, progress: BatchProgress) -> None:
        self._progress_seen = progress  # read by the ticker; no UI work per item

    async def _drive(self, job_id: int) -> None:
        """Run the job to the end (or until cancelled), refreshing the UI every tick."""
        batches = self.state.services.batches
        ticker = asyncio.create_task(self._tick(job_id))
        cancelled = failed = False
        self._in_run = True
        try:
            async for outcome in batches.run_job(
                job_id,
                concurrency=int(self._concurrency.value or 8),
                on_progress=self._on_progress,
            ):
                self._rows.append(outcome_row(outcome))
        except asyncio.CancelledError:
            cancelled = True
        except USER_ERRORS as exc:
            failed = True
            notify(f"Batch #{job_id} stopped: {describe_error(exc)}", "error")
        except Exception as exc:  # never a traceback in the page
            failed = True
            log.exception("batch %s failed", job_id)
            notify(f"Batch #{job_id} stopped: {describe_error(exc)}", "error")
        finally:
            self._in_run = False
            self._active_job = None
            ticker.cancel()
        try:
            self._flush_rows()
            await self._finish(job_id, cancelled=cancelled or self._cancel_requested, failed=failed)
        except Exception:  # the batch is over either way; never leave the buttons locked
            log.exception("batch %s: showing the end failed", job_id)
        finally:
            self._task = None
            self.running = False

    async def _tick(self, job_id: int) -> None:
        last_recorded = time.monotonic()
        recorded_rows = 0
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self._flush_rows()
                self._show_progress(job_id, self._progress_seen)
                shown = len(self._results.value)
                if shown > recorded_rows and time.monotonic() - last_recorded >= RECORDED_EVERY_S:
                    recorded_rows, last_recorded = shown, time.monotonic()
                    self.state.recorded()
            except Exception:  # a display hiccup must not stop the batch or its ticker
                log.exception("batch %s: refreshing the view failed", job_id)

    def _flush_rows(self) -> None:
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        # Local pagination (a stream into a remotely paginated table never shows); the
        # newest RESULTS_SHOWN rows are kept so a huge batch does not grow the page.
        self._results.stream(pd.DataFrame(rows, columns=RESULT_COLUMNS), rollover=RESULTS_SHOWN)

    def _show_progress(self, job_id: int, progress: BatchProgress | None) -> None:
        if progress is None:
            return
        self._progress.value = int(progress.fraction * 100)
        self._status.object = (
            f"Batch #{job_id}: <b>{progress.done:,}/{progress.total:,}</b> done · "
            f"{progress.succeeded:,} succeeded · {progress.failed:,} failed · "
            f"{progress.retrying:,} retrying · {progress.in_flight:,} in flight · "
            f"{_eta(progress.eta_s)}"
        )

    async def _finish(self, job_id: int, *, cancelled: bool, failed: bool) -> None:
        """Final counts from the record, the matrix when complete, and the resumable list."""
        try:
            counts = await self.state.services.batches.counts(job_id)
        except USER_ERRORS as exc:
            counts = None
            notify(describe_error(exc), "error")
        self.state.recorded()
        if counts is not None:
            ran = counts.succeeded + counts.failed  # cancelled items were not run
            self._progress.value = 100 if counts.total == 0 else int(ran * 100 / counts.total)
            state = "cancelled" if cancelled else "stopped" if failed or counts.open else "finished"
            self._status.object = (
                f"Batch #{job_id} {state}: <b>{ran:,}/{counts.total:,}</b> run · "
                f"{counts.succeeded:,} succeeded · {counts.failed:,} failed · "
                f"{counts.cancelled:,} cancelled · {counts.open:,} left"
            )
            if counts.open == 0 and not cancelled and not failed:
                notify(
                    f"Batch #{job_id} finished: {counts.succeeded:,} succeeded, "
                    f"{counts.failed:,} failed",
                    "success" if counts.failed == 0 else "warning",
                )
                await self._show_matrix()
        await self._load_jobs(select=job_id)

    async def _show_matrix(self) -> None:
        if self._group_id is None:
            return
        try:
            frame = await self.state.read(self.state.study.batch_matrix, self._group_id)
        except USER_ERRORS as exc:
            notify(f"Could not build the matrix: {describe_error(exc)}", "error")
            return
        # Column titles are targets (provider / model) and Tabulator renders titles as HTML.
        self._matrix_frame = frame
        frame = frame.rename(columns=lambda c: escape(c)).fillna("")
        self._matrix.value = frame
        self._matrix_box.visible = True

    async def _results_frame(self) -> pd.DataFrame | None:
        """Every call of the batch's group (not only the rows the table keeps)."""
        if self._group_id is None:
            return None
        study = self.state.study
        size = await self.state.read(study.group_size, self._group_id)
        return await self.state.read(study.group_calls, self._group_id, max(size, 1))

    async def _on_cancel(self, _event=None) -> None:
        job_id, task = self.job_id, self._task
        if job_id is None or task is None or task.done():
            return
        self._cancel.disabled = True
        self._cancel_requested = True
        try:
            cancelled = await self.state.services.batches.cancel(job_id)
        except USER_ERRORS as exc:
            notify(f"Could not cancel batch #{job_id}: {describe_error(exc)}", "error")
            cancelled = 0
        if self._in_run and not task.done():
            task.cancel()  # still calling: abandon the calls in flight (recorded as cancelled)
        notify(f"Batch #{job_id} cancelled ({cancelled:,} pending calls skipped); resume it later.")

    def __panel__(self):
        return pn.Column(
            pn.pane.Markdown("### Batch: prompts × models × samples"),
            self._prompts,
            pn.Row(
                pn.pane.HTML(
                    f"or upload prompts ({', '.join(SUPPORTED)}; up to "
                    f"{size_text(self._max_bytes)}, {self._max_prompts:,} prompts):"
                ),
                self._file,
            ),
            pn.Row(self._source, self._use_pasted),
            self._targets,
            pn.Row(self._new_target, self._add),
            pn.Row(self._samples, self._concurrency, self._temperature, self._name),
            pn.Row(self._start, self._cancel),
            self._progress,
            self._status,
            self._results,
            download_buttons(self._results_frame, "batch-results"),
            self._matrix_box,
            pn.pane.Markdown("#### Resume"),
            pn.Row(self._jobs, self._resume, self._refresh_jobs),
            sizing_mode="stretch_width",
        )
