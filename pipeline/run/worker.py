"""One shard, end to end: reader -> mapper -> writer.  Ray wraps :class:`ShardWorker` as an actor.

The worker holds the model for its whole life (loaded once), reads and decodes ahead of the
model on a thread pool, and writes the shard's files itself, so the driver never touches images
or embeddings.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform
import socket
import time
from typing import Any, Iterator, Optional

import torch

from .. import __version__
from ..decode.preprocess import DESCRIPTION as PREPROCESSING, RESIZE, Decoded
from ..errors import ItemError
from ..input.plan import Shard
from ..input.reader import Failed, StageTimes, fetch_shard, read_shard
from ..input.storage import FileSystems
from ..model.batch_size import default_batch_size
from ..model.mapper import make_mapper
from ..output.writer import ShardRows, embeddings_schema, embeddings_table, errors_table, write_shard

log = logging.getLogger(__name__)

# Test-only fault injection (tests/test_faults.py), read from the actor's environment: a worker
# that reaches the CRASH id exits abruptly, like a segfaulting decoder; one that reaches the HANG id
# blocks forever, like a wedged read or driver, until the driver's shard timeout kills it.
CRASH_ENV = "VGG_PIPELINE_FAULT_CRASH_ID"
HANG_ENV = "VGG_PIPELINE_FAULT_HANG_ID"


def uses_gpu_decode(decode: str, mapper: Any) -> bool:
    """JPEGs decoded with nvJPEG: ``runtime.decode`` auto or gpu, a CUDA mapper that takes 224x224
    crops (the dense descriptor needs whole images, decoded on the CPU)."""
    if decode == "cpu" or mapper.device.type != "cuda" or getattr(mapper, "needs_image", False):
        if decode == "gpu":
            log.warning("runtime.decode=gpu needs runtime.device=cuda and descriptor fc7; decoding on the CPU")
        return False
    return True


class ShardWorker:
    """Processes shards; ``process(shard)`` writes its files and returns a summary dict."""

    # Ray runs this many ``process`` calls of one actor at once (threads): the driver keeps as
    # many shards in flight per actor, so one can be read while another is in the model.
    MAX_CONCURRENCY = 1

    def __init__(self, cfg: dict, output: str, storage_options: Optional[dict] = None,
                 num_threads: Optional[int] = None, job: Optional[dict] = None) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.cfg, self.output, self.storage_options = cfg, output, storage_options
        self.job = job  # the driver's job identity (input + model fingerprint), kept for resume checks
        self.mapper = make_mapper(cfg, storage_options, num_threads)
        self.fsys = FileSystems(storage_options, read_concurrency=cfg["input"]["read_concurrency"])
        rt, inp = cfg["runtime"], cfg["input"]
        self.batch_size = rt["batch_size"] or default_batch_size(self.mapper, cfg["model"]["arch"])
        self.threads = rt["decode_threads"] or max(2, min(16, (os.cpu_count() or 2)))
        self.gpu_decoder = None
        if uses_gpu_decode(rt.get("decode", "auto"), self.mapper):
            from ..decode.gpu import GpuBatchDecoder
            self.gpu_decoder = GpuBatchDecoder(self.mapper.device, max_pixels=inp["max_pixels"],
                                               max_bytes=inp["max_bytes"], cpu_threads=self.threads)
        descriptor_dim = getattr(self.mapper, "descriptor_dim", None)
        self.schema = embeddings_schema(cfg["output"]["fc7_dtype"], cfg["output"]["top_k"], descriptor_dim)

    def ready(self) -> dict:
        w = self.mapper.weights
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": str(self.mapper.device),
                "precision": self.mapper.precision, "weights": w.name, "weights_sha256": w.sha256,
                "batch_size": self.batch_size, "decode": "gpu" if self.gpu_decoder else "cpu"}

    def metadata(self, shard: Shard) -> dict:
        import pyarrow
        import torchvision
        w, m = self.mapper.weights, self.cfg["model"]
        model_meta = {"arch": m["arch"], "descriptor": m["descriptor"], "layer": "fc7 (after relu7)"}
        if m["descriptor"] == "dense-multiscale":
            model_meta.update(scales=m["scales"], scale_aggregation=m["scale_aggregation"])
        return {
            "model": model_meta,
            "weights": {"spec": w.spec,
                        "name": w.name, "sha256": w.sha256, "random": w.is_random},
            "preprocessing": PREPROCESSING,
            "dtypes": {"fc7": self.cfg["output"]["fc7_dtype"], "logits": "float32",
                       "compute": self.mapper.precision, "device": self.mapper.device.type},
            "versions": {"vgg_pipeline": __version__, "torch": torch.__version__,
                         "torchvision": torchvision.__version__, "pyarrow": pyarrow.__version__,
                         "python": platform.python_version()},
            "shard": shard.index,
            "shard_digest": shard.digest,
            "job": self.job,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        }

    def process(self, shard: Shard, write: bool = True) -> Any:
        """Turn ``shard`` into rows; write its files (``write=True``) or return the tables."""
        t_start = time.perf_counter()
        rows = ShardRows()
        times = StageTimes()
        model_s = 0.0
        inp = self.cfg["input"]
        dup = {i for i, d in enumerate(shard.duplicate) if d}
        results: dict[int, Any] = {p: ItemError("list", "DuplicateId", "id already listed earlier in the input")
                                   for p in dup}
        crash_id, hang_id = os.environ.get(CRASH_ENV), os.environ.get(HANG_ENV)
        batch: list[Decoded] = []

        def flush() -> None:
            nonlocal model_s
            t0 = time.perf_counter()
            for item, out in self._embed(batch):
                results[item.pos] = out if isinstance(out, ItemError) else (item, out)
            model_s += time.perf_counter() - t0
            batch.clear()

        def before(pos: int) -> None:
            if crash_id and shard.ids[pos] == crash_id:
                os._exit(17)
            if hang_id and shard.ids[pos] == hang_id:
                while True:
                    time.sleep(3600)

        t_loop = time.perf_counter()
        if self.gpu_decoder is not None:
            for decoded in self._gpu_decoded(shard, dup, times, before, results):
                batch.extend(decoded)
                if batch:
                    flush()
        else:
            for res in read_shard(shard.uris, dup, self.fsys, max_pixels=inp["max_pixels"],
                                  max_bytes=inp["max_bytes"], threads=self.threads,
                                  prefetch=2 * self.batch_size,
                                  keep_image=getattr(self.mapper, "needs_image", False),
                                  min_side=max(RESIZE, getattr(self.mapper, "min_side", RESIZE)),
                                  times=times, before_item=before):
                if isinstance(res, Decoded):
                    batch.append(res)
                    if len(batch) == self.batch_size:
                        flush()
                else:
                    results[res.pos] = res.error
            if batch:
                flush()
        # Time the model waited for input (reading, decoding, queue hand-offs): what is not model.
        wait_s = time.perf_counter() - t_loop - model_s

        for pos in range(len(shard)):
            r = results[pos]
            if isinstance(r, ItemError):
                rows.errors.append((shard.ids[pos], shard.uris[pos], r.stage, r.error_type, r.message))
                continue
            item, out = r
            rows.ids.append(shard.ids[pos])
            rows.uris.append(shard.uris[pos])
            rows.widths.append(item.width)
            rows.heights.append(item.height)
            rows.fc7.append(out["fc7"][None])
            rows.logits.append(out["logits"][None])
            if "descriptor" in out:
                rows.descriptor.append(out["descriptor"][None])
                rows.dense_probs.append(out["dense_probs"][None])
        meta = self.metadata(shard)
        emb, err = embeddings_table(rows, self.schema, meta), errors_table(rows.errors, meta)
        summary = {"shard": shard.index, "rows": emb.num_rows, "errors": err.num_rows,
                   "read_s": round(times.read_s, 3), "decode_s": round(times.decode_s, 3),
                   "model_s": round(model_s, 3), "wait_s": round(wait_s, 3),
                   "host": socket.gethostname(), "pid": os.getpid()}
        if not write:
            summary["wall_s"] = round(time.perf_counter() - t_start, 3)
            return emb, err, summary
        t0 = time.perf_counter()
        write_shard(self.output, shard.index, emb, err, self.storage_options)
        summary["write_s"] = round(time.perf_counter() - t0, 3)
        summary["wall_s"] = round(time.perf_counter() - t_start, 3)
        log.info("shard done %s", summary)
        return summary

    def _gpu_decoded(self, shard: Shard, skip: set[int], times: StageTimes, before: Any,
                     results: dict[int, Any]) -> Iterator[list[Decoded]]:
        """The shard's images as device batches: files fetched on the reader threads, JPEGs decoded
        with nvJPEG one batch ahead of the model (:func:`pipeline.decode.gpu.decode_ahead`), the rest on
        the CPU.  Read and decode failures go into ``results``."""
        from ..decode.gpu import decode_ahead

        def encoded_batches() -> Iterator[list[tuple[int, bytes]]]:
            batch: list[tuple[int, bytes]] = []
            for got in fetch_shard(shard.uris, skip, self.fsys, max_bytes=self.cfg["input"]["max_bytes"],
                                   threads=self.threads, prefetch=2 * self.batch_size, times=times,
                                   before_item=before):
                if isinstance(got, Failed):
                    results[got.pos] = got.error
                    continue
                batch.append((got.pos, got.data))
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch

        for gpu_batch in decode_ahead(encoded_batches(), self.gpu_decoder, depth=2):
            times.add(0.0, gpu_batch.decode_s)
            for pos, exc in gpu_batch.failures:
                results[pos] = exc
            yield gpu_batch.to_decoded()

    def _embed(self, batch: list[Decoded]) -> list[tuple[Decoded, Any]]:
        """Embed a batch; if it fails, retry image by image so only the culprit becomes an error row."""
        try:
            out = self.mapper.embed(batch)
        except Exception as exc:  # noqa: BLE001 - one image must not sink its batch
            if len(batch) == 1:
                return [(batch[0], ItemError("model", type(exc).__name__, str(exc).splitlines()[0][:200]))]
            log.warning("batch failed (%s); retrying its %d images one by one", exc, len(batch))
            return [pair for item in batch for pair in self._embed([item])]
        return [(item, {k: v[j] for k, v in out.items()}) for j, item in enumerate(batch)]
