"""The search page: a query box, the index selector, a grid of hits, a player that starts at a hit's moment."""

from __future__ import annotations

import html

_PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#f4f4f5}
header{background:#fff;border-bottom:1px solid #ddd;padding:14px 24px;display:flex;gap:12px;align-items:center;flex-wrap:wrap}
h1{font-size:18px;margin:0 12px 0 0}
#q{flex:1;min-width:240px;font-size:16px;padding:8px 10px;border:1px solid #bbb;border-radius:6px}
select{font-size:14px;padding:7px;border-radius:6px;border:1px solid #bbb}
#status{color:#666;font-size:13px;padding:8px 24px}
#status.error{color:#b00020}
main{display:flex;gap:20px;padding:0 24px 24px;align-items:flex-start}
#grid{flex:1;display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:12px}
.hit{background:#fff;border:1px solid #ddd;border-radius:8px;overflow:hidden;cursor:pointer;padding:0;text-align:left;font:inherit;
  display:flex;flex-direction:column;justify-content:flex-start;min-width:0}
.hit:hover,.hit.playing{border-color:#2563eb;box-shadow:0 0 0 2px #2563eb33}
.hit img{width:100%;height:120px;flex:none;object-fit:contain;background:#111;display:block}
.hit .meta{padding:6px 8px;font-size:12px;width:100%;box-sizing:border-box}
.hit .name{overflow-wrap:anywhere;font-weight:600;display:-webkit-box;-webkit-box-orient:vertical;-webkit-line-clamp:3;overflow:hidden}
.hit .score{font-family:monospace;color:#444}
.hit .nopic{height:120px;flex:none;background:#e5e5e5;color:#777;display:flex;align-items:center;justify-content:center;font-size:12px;padding:0 8px;text-align:center}
.hit.missing{opacity:.7} .hit.missing .name{color:#b00020}
#side{width:420px;position:sticky;top:12px;background:#fff;border:1px solid #ddd;border-radius:8px;padding:12px}
#side[hidden]{display:none}
video{width:100%;background:#000;border-radius:4px}
#now{font-size:13px;margin-top:6px;word-break:break-all}
#playerror{color:#b00020;font-size:13px;margin-top:6px}
</style></head>
<body>
<header><h1>__TITLE__</h1>
<input id="q" type="search" placeholder="describe a moment, e.g. a dog catches a frisbee" autocomplete="off" autofocus>
<select id="index" aria-label="index"></select></header>
<div id="status">loading indexes...</div>
<main><div id="grid"></div>
<aside id="side" hidden><video id="player" controls muted playsinline></video>
<div id="now"></div><div id="playerror" hidden></div></aside></main>
<script>
const $ = (id) => document.getElementById(id);
const q = $("q"), sel = $("index"), grid = $("grid"), status = $("status"), player = $("player");
let timer = null, seq = 0;

function say(text, error) { status.textContent = text; status.className = error ? "error" : ""; }

async function loadIndexes() {
  const r = await fetch("/api/indexes");
  const data = await r.json();
  for (const ix of data.indexes) {
    const o = document.createElement("option");
    o.value = ix.name;
    o.textContent = `${ix.name} (${ix.method}, ${ix.videos} videos, ${ix.search})`;
    sel.appendChild(o);
  }
  say(`${data.indexes.length} index(es) loaded; type to search`);
}

async function search() {
  const text = q.value.trim(), mine = ++seq;
  if (!text) { grid.innerHTML = ""; say("type to search"); return; }
  const url = `/api/search?index=${encodeURIComponent(sel.value)}&q=${encodeURIComponent(text)}`;
  let r, data;
  try { r = await fetch(url); data = await r.json(); } catch (e) { if (mine === seq) say(`search failed: ${e}`, true); return; }
  if (mine !== seq) return;  // a newer query was typed meanwhile
  if (!r.ok) { say(data.error, true); return; }
  say(`${data.hits.length} best of ${data.videos} videos in ${data.index} (${data.took_ms} ms)`);
  grid.innerHTML = "";
  for (const h of data.hits) {
    const b = document.createElement("button");
    b.className = "hit" + (h.available ? "" : " missing");
    b.dataset.video = h.video; b.dataset.url = h.url; b.dataset.time = h.time; b.dataset.available = h.available;
    b.dataset.unavailable = h.unavailable || "";
    let img = document.createElement("img");
    if (h.available) {
      img.alt = h.video; img.src = h.thumb;
      img.addEventListener("error", () => img.replaceWith(noPicture("no picture")), { once: true });
    } else {
      img = noPicture(h.unavailable);
    }
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.innerHTML = `<div class="name"></div><div class="score">#${h.rank} &middot; ${h.score.toFixed(4)} &middot; at ${h.time.toFixed(1)} s</div>`;
    // long names wrap after _ - . / and spaces (mid-word only when a part is still too long), at most 3 lines
    h.video.split(/(?<=[_\-.\/ ])/).forEach((part, i) => meta.firstChild.append(...(i ? [document.createElement("wbr")] : []), part));
    meta.firstChild.title = h.video;
    b.append(img, meta);
    b.addEventListener("click", () => play(b));
    grid.appendChild(b);
  }
}

function noPicture(text) {
  const d = document.createElement("div");
  d.className = "nopic"; d.textContent = text;
  return d;
}

function play(card) {
  document.querySelectorAll(".hit.playing").forEach((c) => c.classList.remove("playing"));
  card.classList.add("playing");
  $("side").hidden = false;
  const t = parseFloat(card.dataset.time), err = $("playerror");
  $("now").textContent = `${card.dataset.video}, from ${t.toFixed(1)} s (its best-matching moment)`;
  err.hidden = true;
  if (card.dataset.available !== "true") {
    player.removeAttribute("src"); player.load(); player.hidden = true;
    err.textContent = card.dataset.unavailable.includes("deleted or moved")
      ? `${card.dataset.video} was deleted or moved since it was indexed: nothing to play.`
      : `${card.dataset.video} cannot be played: ${card.dataset.unavailable}`;
    err.hidden = false;
    return;
  }
  player.hidden = false;
  player.dataset.start = t; player.dataset.startedAt = "";
  player.src = card.dataset.url;
  player.addEventListener("loadedmetadata", () => { player.currentTime = t; }, { once: true });
  player.addEventListener("seeked", () => { player.dataset.startedAt = player.currentTime; player.play().catch(() => {}); }, { once: true });
}

player.addEventListener("error", () => {
  if (!player.getAttribute("src")) return;
  const err = $("playerror");
  err.textContent = "this video could not be played (deleted since indexing, or a format this browser cannot play).";
  err.hidden = false;
});
q.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(search, 200); });  // debounced
sel.addEventListener("change", search);
loadIndexes().then(search).catch((e) => say(`cannot load the indexes: ${e}`, true));
</script></body></html>
"""


def render(title: str) -> str:
    """The page's HTML (it fetches everything else from the JSON API)."""
    return _PAGE.replace("__TITLE__", html.escape(title))
