"""Searching an index with a checkpoint: captions embedded by the model's text encoder, the top k found by
volume (or cosine) through search.py, and optionally reranked by the match head with the checkpoint's fusion.

Reranking needs each candidate clip's own inputs (its frames and audio, for the fusion's condition features):
they are read back from the cache the index was built from, only for the candidates."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch

from gram_ray import storage
from gram_ray.retrieval.index import LoadedIndex, SearchIndexError, load_index
from gram_ray.retrieval.rerank import pair_scores
from gram_ray.retrieval.search import search_captions, search_clips

__all__ = ["Hit", "QueryResult", "Searcher"]


@dataclass
class Hit:
    rank: int
    id: str
    score: float  # what the hits are ordered by: the volume (lower is better) unless reranked or cosine
    volume: float | None
    captions: list[str]
    thumbnail: bytes | None = field(repr=False)
    video_path: str | None
    audio_path: str | None
    match_probability: float | None = None  # with --rerank


@dataclass
class QueryResult:
    query: str
    score: str  # "volume", "cosine", or the rerank score's name
    hits: list[Hit]


class Searcher:
    """An index and the checkpoint it was built with (or `checkpoint`, which must be the same model), on `device`."""

    def __init__(self, index_dir: str, checkpoint: str | None = None, device: str | None = None) -> None:
        from gram_ray.retrieval.inference import inference_model

        self.index: LoadedIndex = load_index(index_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.checkpoint = checkpoint or self.index.meta["checkpoint"]["path"]
        self.model, self.cfg, self.collate = inference_model(self.checkpoint, self.device, every_caption=True)
        self.clips = self.index.clips.to(self.device)

    def embed_captions(self, texts: list[str]) -> torch.Tensor:
        from gram_ray.data.text import tokenize

        tokens = tokenize(self.collate.tokenizer, texts, self.cfg.model.max_text_length)
        batch = {k: v.to(self.device) for k, v in tokens.items()}
        with torch.no_grad():
            return self.model.embed(batch, ["text"])["text"]

    def search(
        self, texts: list[str], k: int = 10, score: str = "volume", rerank: bool = False, rerank_k: int | None = None
    ) -> list[QueryResult]:
        """Each caption's top k clips. rerank: the top rerank_k (default eval.rerank_k, at least k) by volume are
        rescored with eval.rerank_score and the best k returned."""
        queries = self.embed_captions(texts)
        if rerank:  # the candidates are the top rerank_k by volume, whatever `score` says
            if self.model.fusion is None:
                raise SearchIndexError(
                    f"{self.checkpoint} has no match head (trained without the matching loss, model.itm_ratio 0): "
                    "search without --rerank"
                )
            volumes, found = search_clips(queries, self.clips, max(k, rerank_k or self.cfg.eval.rerank_k))
            return [self._reranked(t, volumes[i], found[i], k) for i, t in enumerate(texts)]
        scores, found = search_clips(queries, self.clips, k, score=score)
        volumes = scores if score == "volume" else None
        results = []
        for i, text in enumerate(texts):
            vols = volumes[i].tolist() if volumes is not None else [None] * len(found[i])
            hits = [
                self._hit(r, int(j), float(s), v)
                for r, (j, s, v) in enumerate(zip(found[i], scores[i], vols, strict=True))
            ]
            results.append(QueryResult(text, score, hits))
        return results

    def similar_captions(self, clip_id: str, k: int = 10) -> QueryResult:
        """Clip -> captions: the index's captions with the lowest volume with one of its clips."""
        try:
            row = self.index.ids.index(clip_id)
        except ValueError:
            raise SearchIndexError(f"no clip {clip_id!r} in the index ({len(self.index.ids)} clips)") from None
        clip = {m: e[row : row + 1].to(self.device) for m, e in self.clips.embeddings.items()}
        volumes, found = search_captions(clip, self.index.caption_embeddings.to(self.device), k)
        flat = [c for caps in self.index.captions for c in caps]
        hits = []
        for rank, (j, v) in enumerate(zip(found[0].tolist(), volumes[0].tolist(), strict=True)):
            owner = int(self.index.caption_clip[j])
            hit = self._hit(rank, owner, v, v)
            hit.captions = [flat[j]]
            hits.append(hit)
        return QueryResult(f"clip {clip_id}", "volume", hits)

    def _hit(self, rank: int, row: int, score: float, volume: float | None) -> Hit:
        ix = self.index
        return Hit(
            rank + 1,
            ix.ids[row],
            score,
            volume,
            ix.captions[row],
            ix.thumbnails[row],
            ix.video_paths[row],
            ix.audio_paths[row],
        )

    def _reranked(self, text: str, volumes: torch.Tensor, rows: torch.Tensor, k: int) -> QueryResult:
        from gram_ray.data.schema import IDS
        from gram_ray.data.text import tokenize
        from gram_ray.model.device import to_device

        rows = rows.tolist()
        batch = self.collate(self._cache_rows([self.index.ids[r] for r in rows]))
        order = {clip: n for n, clip in enumerate(batch[IDS])}
        keep = [n for n, r in enumerate(rows) if self.index.ids[r] in order]  # clips whose inputs were found
        tokens = tokenize(self.collate.tokenizer, [text], self.cfg.model.max_text_length)
        with torch.no_grad():
            model_batch = to_device(batch, self.device)
            condition = self.model.condition(self.model.encode(model_batch, self.model.fusion.order))
            condition = condition[[order[self.index.ids[rows[n]]] for n in keep]]
            ids = tokens["input_ids"].to(self.device).expand(len(keep), -1)
            mask = tokens["attention_mask"].to(self.device).expand(len(keep), -1)
            log_odds = self.model.match_logits(ids, mask, condition).float().diff(dim=-1).squeeze(-1).cpu()
        kept_volumes = volumes[keep].cpu()
        temperature = self.model.loss_fn.temperature.item()
        scores = pair_scores(kept_volumes, log_odds, self.cfg.eval.rerank_score, temperature)
        best = scores.argsort(descending=True)[:k].tolist()
        hits = []
        for rank, b in enumerate(best):
            hit = self._hit(rank, rows[keep[b]], float(scores[b]), float(kept_volumes[b]))
            hit.match_probability = float(torch.sigmoid(log_odds[b]))
            hits.append(hit)
        return QueryResult(text, f"rerank:{self.cfg.eval.rerank_score}", hits)

    def _cache_rows(self, clip_ids: list[str]) -> dict:
        """The candidates' rows of the caches the index was built from, as a numpy batch for collate."""
        from gram_ray.data.parquet_layout import numpy_rows

        wanted = set(clip_ids)
        tables = []
        for source in self.index.meta["sources"]:
            table = _rows_with_ids(storage.join(source["data"], "shards"), wanted)
            if table.num_rows:
                tables.append(table)
                wanted -= set(table.column("id").to_pylist())
        if not tables:
            raise SearchIndexError(
                "none of the candidates' clips are in the caches the index was built from "
                f"({[s['data'] for s in self.index.meta['sources']]}): reranking needs them; search without --rerank"
            )

        return numpy_rows(pa.concat_tables(tables))


def _rows_with_ids(shards: str, ids: set[str]) -> pa.Table:
    """The rows of a cache's shards whose id is one of ids (Parquet's statistics skip the other row groups)."""

    def read() -> pa.Table:
        fs, path = storage.resolve(shards)
        return pads.dataset(path, filesystem=fs, format="parquet").to_table(filter=pc.field("id").isin(list(ids)))

    return storage.with_retries("reading", shards, read)
