"""Where samples come from: shard specs, weighted sources, and the deterministic shard sequence of each stream.

A *stream* is what one data worker of one rank reads: stream ``r`` of rank ``rank`` produces the
batches of steps ``≡ r (mod streams)``. Its k-th shard is a pure function of (seed, rank, r, k), so every
node computes the same split without talking, and a position ``(k, item)`` names a sample for good:
after a restart the stream reopens at a position instead of starting over.

- ordered mode: epoch ``e`` shuffles all shards with (seed, e) — the same order on every node — and
  stream ``r`` of rank ``rank`` reads ``order[rank::world][r::streams]``; every sample once per epoch.
- resampled mode: every shard is drawn with replacement, a source chosen by its weight first.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

from vlmtrain.data.config import VideoConfig
from vlmtrain.data.samples import RawSample, SampleError, parse_sample
from vlmtrain.data.video import with_frames
from vlmtrain.errors import UserError
from vlmtrain.modeling.prompt import FRAMES_AS_IMAGES, FrameLayout
from vlmtrain.seeding import mix, unit

DEFAULT_VIDEO = VideoConfig()  # a recipe's data.video when none is given

Position = tuple[int, int]  # (index of the shard in the stream's sequence, index of the sample in that shard)


@dataclass(frozen=True)
class Source:
    """One named set of shards and its sampling weight (used in resampled mode)."""

    urls: tuple[str, ...]
    weight: float = 1.0


def expand_shards(spec: str) -> list[str]:
    """Expand a shard spec (brace patterns, ``::``-separated lists, ``pipe:`` URLs); local files must exist."""
    urls = expand_urls(spec)
    local = [url for url in urls if "://" not in url and not url.startswith("pipe:")]
    missing = [url for url in local if not Path(url).is_file()]
    if not urls or missing:
        raise FileNotFoundError(f"shard spec {spec!r}: {len(missing)} of {len(urls)} shards not found, e.g. {missing[:1]}")
    return urls


@dataclass(frozen=True)
class StreamId:
    """Which stream of the run this is: rank ``rank`` of ``world``, stream ``index`` of ``count`` per rank."""

    rank: int
    world: int
    index: int
    count: int


class ShardSequence:
    """The endless sequence of shards one stream reads, and the epoch each belongs to."""

    def __init__(self, sources: list[Source], seed: int, stream: StreamId, resampled: bool) -> None:
        self.sources = sources
        self.seed = seed
        self.stream = stream
        self.resampled = resampled
        self.urls = [url for source in sources for url in source.urls]
        self.per_epoch = len(self.urls[stream.rank :: stream.world][stream.index :: stream.count])
        if not resampled and self.per_epoch == 0:
            raise UserError(
                f"{len(self.urls)} shards cannot feed {stream.world} ranks x {stream.count} data workers: "
                "write more shards, lower data.num_workers, or set data.resampled: true"
            )

    def epoch_order(self, epoch: int) -> list[str]:
        """All shards in the order of ``epoch``: identical on every node."""
        order = list(self.urls)
        random.Random(mix(self.seed, epoch)).shuffle(order)
        return order

    def shard(self, k: int) -> tuple[str, int]:
        """The stream's ``k``-th shard and its epoch."""
        stream = self.stream
        if self.resampled:
            weights = [source.weight for source in self.sources]
            pick = unit(self.seed, stream.rank, stream.index, k, 0) * sum(weights)
            edges = zip(self.sources, _cumulative(weights), strict=True)
            source = next((s for s, edge in edges if pick < edge), self.sources[-1])
            return source.urls[int(unit(self.seed, stream.rank, stream.index, k, 1) * len(source.urls))], 0
        epoch, offset = divmod(k, self.per_epoch)
        return self.epoch_order(epoch)[stream.rank :: stream.world][stream.index :: stream.count][offset], epoch


def _cumulative(weights: list[float]) -> list[float]:
    total, edges = 0.0, []
    for weight in weights:
        total += weight
        edges.append(total)
    return edges


class _CheckedStream:
    """A read-only stream that remembers how many bytes passed and the last 1024 of them.

    Python's tarfile takes an archive cut at a member boundary for a complete one; a complete tar is
    whole 512-byte blocks ending in zero blocks, which is what :meth:`complete` checks.
    """

    def __init__(self, stream) -> None:
        self.stream = stream
        self.size = 0
        self.tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.size += len(data)
        self.tail = (self.tail + data)[-1024:]
        return data

    def complete(self) -> bool:
        """Read what the tar reader left and say whether the archive ended properly."""
        while self.read(1 << 16):
            pass
        return self.size % 512 == 0 and len(self.tail) == 1024 and not self.tail.strip(b"\0")

    def close(self) -> None:
        self.stream.close()


def read_shard(
    url: str, video: VideoConfig = DEFAULT_VIDEO, layout: FrameLayout = FRAMES_AS_IMAGES
) -> Iterator[RawSample | SampleError]:
    """The samples of one shard in order (their videos as frames sampled by ``video``, written as ``layout`` says:
    :func:`with_frames`), a malformed one as its SampleError (so positions stay stable); a shard that cannot be
    opened or breaks off ends with a SampleError of kind ``bad_shard``."""
    errors: list[Exception] = []

    def keep(error: Exception) -> bool:
        errors.append(error)
        return True

    try:
        stream = _CheckedStream(gopen(url))
    except Exception as error:  # missing file, failing pipe command, ...
        yield SampleError("bad_shard", f"shard {url} cannot be opened: {type(error).__name__}: {error}")
        return
    try:
        for files in group_by_keys(tar_file_expander([{"url": url, "stream": stream}], handler=keep), handler=keep):
            try:
                yield with_frames(parse_sample(files), video, layout)
            except SampleError as error:
                yield error
        if not errors and not stream.complete():
            errors.append(EOFError("the archive ends before its end-of-archive blocks"))
    finally:
        try:
            stream.close()
        except Exception as error:  # a pipe: command that failed reports it when closed
            errors.append(error)
    if errors:
        yield SampleError("bad_shard", f"shard {url} broke off: {type(errors[0]).__name__}: {errors[0]}")


@dataclass
class Arrival:
    """A sample as it leaves a stream: where it was, which epoch, and the sample (or why it is unusable)."""

    position: Position
    epoch: int
    sample: RawSample | SampleError
    url: str


def stream_samples(
    shards: ShardSequence, start: Position, video: VideoConfig = DEFAULT_VIDEO, layout: FrameLayout = FRAMES_AS_IMAGES
) -> Iterator[Arrival]:
    """Every sample of the stream from position ``start`` on, forever (videos as frames: :func:`read_shard`)."""
    k, first_item = start
    while True:
        url, epoch = shards.shard(k)
        produced = False
        for item, sample in enumerate(read_shard(url, video, layout)):
            if item >= first_item:
                produced = True
                yield Arrival((k, item), epoch, sample, url)
        if not produced and first_item == 0:
            yield Arrival((k, -1), epoch, SampleError("bad_shard", f"shard {url} holds no sample"), url)
        k, first_item = k + 1, 0
