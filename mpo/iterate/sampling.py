"""Where a round's responses come from: a server this command runs, or the model in-process.

:class:`Sampler` hands out a data-pipeline backend for a checkpoint. With a server sampler
(``vllm`` or ``server``) it keeps at most one server: the one on round k's model serves round k's
evaluation and round k+1's sampling, then :meth:`Sampler.release` stops it before training (on a
GPU the two would share the memory). The server names the checkpoint by its absolute path, so a
resumed sampling log (whose settings hash holds the served model's name) continues on a new server
of the same checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mpo.iterate.config import IterateConfig, vllm_python
from mpo.iterate.server import ServedModel, fill_command, free_port

VLLM_SERVER = ["-m", "vllm.entrypoints.openai.api_server", "--model", "{model}", "--served-model-name", "{model}",
               "--host", "127.0.0.1", "--port", "{port}", "--trust-request-mm-kwargs"]
"""The vLLM server's fixed arguments (after its Python): the per-request tile budget
(``mm_processor_kwargs``) needs ``--trust-request-mm-kwargs``."""


def server_command(config: IterateConfig) -> list[str]:
    """The server command template (``{model}``, ``{port}`` unfilled) of a server sampler."""
    if config.sampler == "vllm":
        return [vllm_python(config), *VLLM_SERVER, *config.server_args]
    return list(config.server_command)


class Sampler:
    """Backends for checkpoints, by :attr:`IterateConfig.sampler`.

    Args:
        config: the ``iterate:`` section.
        record_path: ``server.json`` (written while a server runs).
    """

    def __init__(self, config: IterateConfig, record_path: Path):
        self.config, self.record_path = config, record_path
        self.server: ServedModel | None = None
        self.backend_model: str | None = None
        self._backend = None

    @property
    def batch_size(self) -> int:
        """Questions per generate call: a local model batches what it gets, a server across requests."""
        if self.config.batch_size:
            return self.config.batch_size
        return 4 if self.config.sampler == "transformers" else 2 * self.config.concurrency

    def backend(self, model: Path, log_path: Path):
        """A backend generating with ``model``; a server sampler starts a server on it unless one
        runs already (another model's is stopped first).

        Args:
            model: the checkpoint directory.
            log_path: where a started server logs.
        """
        model_name = str(model.resolve())
        if self.backend_model == model_name:
            return self._backend
        self.release()
        if self.config.sampler == "transformers":
            from data_pipeline.backends import TransformersBackend

            self._backend = TransformersBackend(model_name, device=self.config.device)
        else:
            from data_pipeline.openai_client import OpenAIBackend

            port = free_port()
            command = fill_command(server_command(self.config), model_name, port)
            print(f"starting the server on {model_name}: {' '.join(command)} (log: {log_path})", file=sys.stderr, flush=True)
            self.server = ServedModel(command, model_name, port, log_path, self.record_path, self.config.server_timeout,
                                      own_environment=self.config.sampler == "vllm").start()
            self._backend = OpenAIBackend(self.server.url, model=model_name, concurrency=self.config.concurrency,
                                          timeout=self.config.request_timeout)
        self.backend_model = model_name
        return self._backend

    def release(self) -> None:
        """Frees what generates: stops the server by its process ID, drops an in-process model."""
        if self._backend is not None:
            self._backend.close()
        self._backend, self.backend_model = None, None
        if self.server is not None:
            print(f"stopping the server on {self.server.model} (pid {self.server.process.pid})", file=sys.stderr, flush=True)
            self.server.stop()
            self.server = None
