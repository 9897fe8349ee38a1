"""A suite's run on the backend of this process."""

import dataclasses

from benchmarks.harness.documents import new_document
from benchmarks.harness.metadata import collect_metadata
from benchmarks.harness.metadata import detect_accelerator
from benchmarks.harness.metadata import finish_metadata
from benchmarks.harness.result_files import result_path
from benchmarks.harness.result_files import write_json


@dataclasses.dataclass
class SuiteRun:
    """A suite measuring on the backend of this process, from `start_run`.

    Attributes:
        suite: Name of the suite.
        output_dir: Where its results go.
        start_time: `time.perf_counter()` when the suite's `main` started.
        metadata: `metadata.collect_metadata` of this process, completed
            by `finish`.
        document: The result document (`documents.new_document`) the
            suite fills.
    """

    suite: str
    output_dir: str
    start_time: float
    metadata: dict
    document: dict

    @property
    def backend(self):
        return self.metadata["backend"]

    def save(self):
        """Writes the document as it stands to `<suite>_<backend>.json`.

        Long suites call it as they go, so that an interrupted run keeps what
        it measured.
        """
        return write_json(
            result_path(self.output_dir, self.suite, self.backend, ".json"),
            self.document,
        )

    def finish(self, report):
        """Completes the metadata, then writes the document and its report.

        Args:
            report: The suite's `report(document, output_dir, stem)`.

        Returns:
            0, the exit status of a suite's `main` that got this far.
        """
        finish_metadata(self.metadata, self.start_time)
        self.save()
        report(self.document, self.output_dir, f"{self.suite}_{self.backend}")
        print(
            f"{self.suite} on {self.backend}: {self.metadata['wall_time_s']} s"
        )
        return 0


def start_run(suite, args, config, start_time, accelerator=None):
    """Starts a suite's run on the backend of this process.

    Imports Keras: call it from the suite's `main`, once `KERAS_BACKEND` is
    set.

    Args:
        suite: Name of the suite.
        args: The parsed command line (`quick`, `output_dir`).
        config: What the suite measures; it stays the document's, so that
            what the suite adds to it later is saved too.
        start_time: `time.perf_counter()` when the suite's `main` started,
            so that the wall time includes importing the backend.
        accelerator: The output of `metadata.detect_accelerator`, where
            the suite already has it.

    Returns:
        A `SuiteRun` with an empty document.
    """
    import keras

    backend = keras.backend.backend()
    if accelerator is None:
        accelerator = detect_accelerator(backend)
    metadata = collect_metadata(suite, args.quick, backend, accelerator)
    return SuiteRun(
        suite=suite,
        output_dir=args.output_dir,
        start_time=start_time,
        metadata=metadata,
        document=new_document(suite, metadata, config),
    )
