"""Search results as one static HTML page: each query with its top clips (thumbnail, captions, score, and a video
and an audio player pointing at the clip's media).

The thumbnails are inlined (data: URIs), so the page is one file that can be copied or attached anywhere. The
players point at the media: a local file by its path relative to the page (absolute when it is elsewhere), a
storage object by its URI shown as text (a browser cannot open s3:// or gs://; download it or serve the bucket
over HTTPS). Each thumbnail marks itself loaded or broken when the page opens, and the page counts them in
<body data-thumbnails-loaded=... data-thumbnails-broken=...>, which is what a browser test reads.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

from gram_ray import storage
from gram_ray.data.manifest import IMAGE_EXTENSIONS
from gram_ray.retrieval.query import Hit, QueryResult

__all__ = ["write_gallery", "render_gallery"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.2rem; background: #fafafa; color: #222; }
h1 { font-size: 1.25rem; margin: 0 0 .2rem; } .meta { color: #666; font-size: .8rem; font-weight: normal; }
section { margin-bottom: 1.2rem; } h2 { font-size: 1rem; margin: .3rem 0 .4rem; }
.hits { display: flex; flex-wrap: wrap; gap: .6rem; }
.hit { width: 176px; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .4rem; font-size: .75rem; }
.hit.same { border: 2px solid #2a8a3a; }
.hit img { width: 100%; aspect-ratio: 1; object-fit: cover; border-radius: 4px; background: #eee; display: block; }
.hit img.broken { outline: 2px solid #c00; }
.noframe { width: 100%; aspect-ratio: 1; display: flex; align-items: center; justify-content: center;
  background: #eee; color: #777; border-radius: 4px; }
.rank { font-weight: 600; } .score { color: #555; float: right; } .id { color: #888; word-break: break-all; }
.caption { margin: .25rem 0; } video, audio { width: 100%; height: 32px; margin-top: .2rem; display: block; }
.uri { color: #777; word-break: break-all; }
"""

_SCRIPT = """
function thumbs() {
  const imgs = [...document.querySelectorAll('img.thumbnail')];
  const loaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  imgs.filter(i => i.complete && i.naturalWidth === 0).forEach(i => i.classList.add('broken'));
  document.body.dataset.thumbnailsLoaded = loaded;
  document.body.dataset.thumbnailsBroken = imgs.length - loaded;
}
window.addEventListener('load', thumbs);
"""


def _media_link(path: str | None, page_dir: Path) -> str | None:
    """A src for the players: a local file relative to the page when it is below the page's folder's parent, else
    absolute (file:); None for a storage URI."""
    if not path:
        return None
    if storage.is_uri(path):
        return None
    absolute = Path(path).resolve()
    try:
        return Path(os.path.relpath(absolute, page_dir)).as_posix()
    except ValueError:  # another drive (Windows)
        return absolute.as_uri()


def _hit_html(hit: Hit, page_dir: Path, query: str) -> str:
    e = html.escape
    if hit.thumbnail:
        data = base64.b64encode(hit.thumbnail).decode()
        picture = f'<img class="thumbnail" alt="{e(hit.id)}" src="data:image/jpeg;base64,{data}">'
    else:
        picture = '<div class="noframe">no video</div>'
    score = f"{hit.score:.4f}"
    if hit.match_probability is not None:
        score = f"{hit.score:.2f} (p {hit.match_probability:.2f}, vol {hit.volume:.3f})"
    players = []
    for kind, path in (("video", hit.video_path), ("audio", hit.audio_path)):
        link = _media_link(path, page_dir)
        if link and kind == "video" and path.endswith(IMAGE_EXTENSIONS):  # a still image: the thumbnail is it
            players.append(f'<div class="uri"><a href="{e(link)}">full image</a></div>')
        elif link:
            players.append(f'<{kind} controls preload="none" src="{e(link)}"></{kind}>')
        elif path:
            players.append(f'<div class="uri">{kind}: {e(path)}</div>')
    captions = "".join(f'<div class="caption">{e(c)}</div>' for c in hit.captions[:3])
    # A clip one of whose own captions is the query (the demo's, and any search for a known caption) is framed.
    css = "hit same" if query in hit.captions else "hit"
    return (
        f'<div class="{css}"><div><span class="rank">#{hit.rank}</span><span class="score">{e(score)}</span></div>'
        f'{picture}<div class="id">{e(hit.id)}</div>{captions}{"".join(players)}</div>'
    )


def render_gallery(results: list[QueryResult], page: Path, title: str) -> str:
    e = html.escape
    page_dir = page.resolve().parent
    sections = []
    for result in results:
        hits = "".join(_hit_html(h, page_dir, result.query) for h in result.hits)
        sections.append(
            f'<section><h2>{e(result.query)} <span class="meta">by {e(result.score)}</span></h2>'
            f'<div class="hits">{hits}</div></section>'
        )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
        f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>"
        f'<h1>{e(title)}</h1><div class="meta">{len(results)} queries; volume: lower is better (cosine, rerank: '
        "higher); a green frame: the clip's own caption is the query</div>"
        f"{''.join(sections)}</body></html>"
    )


def write_gallery(results: list[QueryResult], page: str | Path, title: str = "gram-ray search") -> Path:
    page = Path(page)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render_gallery(results, page, title))
    return page
