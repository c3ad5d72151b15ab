// 万物识别 web page: pick or drop images, send them to /v1/recognize, show top-k labels per image; with an
// image index on the server (wanwu serve --index), search it by text and find photos similar to each card.
(function () {
  "use strict";

  const CHUNK = 8;          // images per request
  const PARALLEL = 2;       // requests in flight
  const MAX_RETRIES = 3;    // on 503 (queue full / model loading)

  const ERROR_TEXT = {
    not_found: "找不到文件",
    decode_error: "无法解码图片（文件可能已损坏，或不是图片）",
    too_large: "文件或图片尺寸过大",
    unsupported: "不是受支持的图片格式",
    fetch_error: "获取失败",
    internal: "服务器内部错误",
  };
  const REQUEST_TEXT = {
    401: "需要有效的 API 密钥，请在上方填写后重试",
    413: "上传内容超过服务器的大小限制",
    415: "请求格式不受支持",
    404: "服务器没有图库索引",
    422: "请求无效",
    503: "服务器繁忙或模型尚未就绪，请稍后重试",
  };

  const $ = (id) => document.getElementById(id);
  const input = $("file-input"), zone = $("drop-zone"), results = $("results"), statusLine = $("status");
  const topK = $("top-k"), keyBox = $("key-box"), keyInput = $("api-key");
  const labelsBox = $("labels-box"), labelsInput = $("labels");
  const searchBox = $("search-box"), searchForm = $("search-form"), searchText = $("search-text");
  const searchResults = $("search-results"), searchTitle = $("search-title"), hits = $("hits");
  const urls = [], hitUrls = [];
  const cardFiles = new WeakMap();  // card -> the File it shows ("find similar" sends it to /v1/search)
  let pending = 0, okCount = 0, errCount = 0;
  let index = null;  // what /v1/models says of the server's image index: {rows, dim, text}, or null

  keyInput.value = localStorage.getItem("wanwu-api-key") || "";
  if (keyInput.value) keyBox.hidden = false;
  // A zero-shot (CLIP) model takes the user's own label list: show the text box only for one. A server with an
  // image index gets the search box. Asked again once a key is typed (a server with keys answers 401 before).
  function loadModels() {
    fetch("/v1/models", { headers: authHeaders() }).then((r) => {
      if (r.status === 401) keyBox.hidden = false;  // a server with keys: ask for one at once
      return r.ok ? r.json() : null;
    }).then((body) => {
      if (body && body.models && body.models.some((m) => m.zero_shot)) labelsBox.hidden = false;
      const withIndex = body && body.models ? body.models.find((m) => m.index) : null;
      if (withIndex) showSearch(withIndex.index);
    }).catch(() => {});
  }
  loadModels();
  keyInput.addEventListener("change", () => { localStorage.setItem("wanwu-api-key", keyInput.value); loadModels(); });

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setStatus(text, isError) {
    statusLine.textContent = text;
    statusLine.classList.toggle("error", !!isError);
  }

  function makeCard(file) {
    const card = el("article", "card");
    card.dataset.status = "pending";
    const thumb = el("div", "thumb");
    const img = el("img");
    const url = URL.createObjectURL(file);
    urls.push(url);
    img.alt = file.name;
    img.src = url;
    img.addEventListener("error", () => thumb.replaceChildren(el("span", "no-preview", "无法预览")));
    thumb.appendChild(img);
    const body = el("div", "card-body");
    body.appendChild(el("p", "name", file.name));
    const content = el("div", "content");
    content.appendChild(el("p", "pending", "识别中…"));
    body.appendChild(content);
    card.append(thumb, body);
    results.appendChild(card);
    cardFiles.set(card, file);
    return card;
  }

  function formatScore(score, asPercent) {
    return asPercent ? (score * 100).toFixed(1) + "%" : score.toFixed(2);
  }

  function showRecord(card, record) {
    const content = card.querySelector(".content");
    content.replaceChildren();
    card.dataset.status = record.status;
    if (record.status !== "ok") {
      card.classList.add("error");
      const err = record.error || { type: "internal", message: "" };
      const box = el("p", "error-message", "识别失败：" + (ERROR_TEXT[err.type] || err.type));
      box.appendChild(el("span", "error-detail", err.message));
      content.appendChild(box);
      errCount += 1;
      return;
    }
    okCount += 1;
    const preds = record.predictions || [];
    if (!preds.length) {
      content.appendChild(el("p", "pending", "没有得分高于阈值的标签"));
      return;
    }
    const asPercent = preds.every((p) => p.score >= 0 && p.score <= 1);
    const top = Math.max(...preds.map((p) => Math.abs(p.score)), 1e-9);
    const list = el("ol", "preds");
    for (const p of preds) {
      const row = el("li", "pred");
      const label = el("span", "label", p.label);
      label.title = p.label + "（类别 " + p.index + "）";
      const bar = el("div", "bar");
      const fill = el("span");
      const width = asPercent ? p.score * 100 : (Math.abs(p.score) / top) * 100;
      fill.style.width = Math.max(0, Math.min(100, width)).toFixed(1) + "%";
      bar.appendChild(fill);
      row.append(label, bar, el("span", "score", formatScore(p.score, asPercent)));
      list.appendChild(row);
    }
    content.appendChild(list);
    if (index) addSimilarButton(card);
  }

  function authHeaders() {
    return keyInput.value ? { Authorization: "Bearer " + keyInput.value } : {};
  }

  function showSearch(info) {
    index = info;
    searchBox.hidden = false;
    searchForm.hidden = !info.text;  // only a model with a text tower (Chinese-CLIP) takes text queries
    $("search-hint").textContent = (info.text ? "输入文字搜索图库，或" : "") +
      "点击识别结果上的“找相似”，在图库（" + info.rows + " 张）中查找相似的图片。";
    document.querySelectorAll(".card[data-status=ok]").forEach(addSimilarButton);
  }

  function addSimilarButton(card) {
    if (card.querySelector(".similar") || !cardFiles.has(card)) return;
    const button = el("button", "button secondary similar", "找相似");
    button.type = "button";
    button.addEventListener("click", () => {
      const form = new FormData();
      form.append("files", cardFiles.get(card), cardFiles.get(card).name);
      search(form, "与“" + cardFiles.get(card).name + "”相似的图片");
    });
    card.querySelector(".card-body").appendChild(button);
  }

  async function search(form, title) {
    form.append("k", "12");
    setStatus("正在搜索…");
    let response, body = null;
    try {
      response = await fetch("/v1/search", { method: "POST", body: form, headers: authHeaders() });
      body = await response.json();
    } catch (e) {
      setStatus(response ? "搜索失败（HTTP " + response.status + "）" : "无法连接服务器", true);
      return;
    }
    if (!response.ok) {
      if (response.status === 401) keyBox.hidden = false;
      const detail = body && body.error ? body.error.message : "HTTP " + response.status;
      setStatus("搜索失败：" + (REQUEST_TEXT[response.status] || "请求失败") + "（" + detail + "）", true);
      return;
    }
    const answer = body.queries[0];
    if (answer.error) {
      setStatus("搜索失败：" + (ERROR_TEXT[answer.error.type] || answer.error.type) + "（" + answer.error.message +
        "）", true);
      return;
    }
    showHits(title, answer.results);
    setStatus("找到 " + answer.results.length + " 张图片。");
  }

  function showHits(title, found) {
    hitUrls.splice(0).forEach((u) => URL.revokeObjectURL(u));
    hits.replaceChildren();
    searchTitle.textContent = title;
    searchResults.hidden = false;
    for (const hit of found) {
      const tile = el("article", "hit");
      const thumb = el("div", "thumb");
      thumb.appendChild(el("span", "no-preview", "加载中…"));
      const name = hit.input.split(/[\\/]/).pop();
      const body = el("div", "hit-body");
      body.append(el("span", "score", "相似度 " + hit.score.toFixed(3)), el("p", "name", name));
      if (hit.labels && hit.labels.length) body.appendChild(el("span", "hit-labels", hit.labels.join("、")));
      tile.append(thumb, body);
      tile.title = hit.input;
      hits.appendChild(tile);
      loadThumb(thumb, hit, name);
    }
  }

  async function loadThumb(thumb, hit, name) {
    // fetch (not <img src>): the API key travels in a header; the page shows the bytes as a blob.
    try {
      const response = await fetch("/v1/search/images/" + hit.sha256, { headers: authHeaders() });
      if (!response.ok) throw new Error("HTTP " + response.status);
      const url = URL.createObjectURL(await response.blob());
      hitUrls.push(url);
      const img = el("img");
      img.alt = name;
      img.src = url;
      thumb.replaceChildren(img);
    } catch (e) {
      thumb.replaceChildren(el("span", "no-preview", "无预览"));
    }
  }

  function failCard(card, text) {
    showRecord(card, { status: "error", error: { type: "request", message: text } });
    card.querySelector(".error-message").firstChild.textContent = "识别失败：" + text;
  }

  async function send(files, cards, attempt) {
    const form = new FormData();
    for (const f of files) form.append("files", f, f.name);
    form.append("top_k", topK.value);
    if (!labelsBox.hidden && labelsInput.value.trim()) form.append("labels", labelsInput.value);
    const headers = {};
    if (keyInput.value) headers["Authorization"] = "Bearer " + keyInput.value;
    let response;
    try {
      response = await fetch("/v1/recognize", { method: "POST", body: form, headers });
    } catch (e) {
      cards.forEach((c) => failCard(c, "无法连接服务器"));
      return;
    }
    if (response.status === 503 && attempt < MAX_RETRIES) {
      const wait = Number(response.headers.get("Retry-After") || "1");
      await new Promise((r) => setTimeout(r, Math.max(1, wait) * 1000));
      return send(files, cards, attempt + 1);
    }
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (!response.ok) {
      if (response.status === 401) keyBox.hidden = false;
      const detail = body && body.error ? body.error.message : "HTTP " + response.status;
      const text = (REQUEST_TEXT[response.status] || "请求失败") + "（" + detail + "）";
      setStatus(text, true);
      cards.forEach((c) => failCard(c, text));
      return;
    }
    body.results.forEach((record, i) => showRecord(cards[i], record));
  }

  async function recognize(fileList) {
    const files = Array.from(fileList);
    if (!files.length) return;
    const cards = files.map(makeCard);
    pending += files.length;
    setStatus("正在识别 " + pending + " 张图片…");
    const jobs = [];
    for (let i = 0; i < files.length; i += CHUNK) jobs.push([files.slice(i, i + CHUNK), cards.slice(i, i + CHUNK)]);
    const worker = async () => {
      while (jobs.length) {
        const [chunk, chunkCards] = jobs.shift();
        await send(chunk, chunkCards, 0);
        pending -= chunk.length;
      }
    };
    await Promise.all(Array.from({ length: Math.min(PARALLEL, jobs.length) }, worker));
    if (pending === 0) {
      const failed = errCount ? "，失败 " + errCount + " 张" : "";
      setStatus("识别完成：成功 " + okCount + " 张" + failed + "。", errCount > 0 && okCount === 0);
    }
  }

  input.addEventListener("change", () => { recognize(input.files); input.value = ""; });
  zone.addEventListener("click", (e) => { if (e.target === zone) input.click(); });
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
  ["dragenter", "dragover"].forEach((type) => zone.addEventListener(type, (e) => {
    e.preventDefault();
    zone.classList.add("dragging");
  }));
  ["dragleave", "drop"].forEach((type) => zone.addEventListener(type, (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
  }));
  zone.addEventListener("drop", (e) => recognize(e.dataTransfer.files));
  searchForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = searchText.value.trim();
    if (!text) return;
    const form = new FormData();
    form.append("text", text);
    search(form, "“" + text + "”的搜索结果");
  });
  $("clear").addEventListener("click", () => {
    results.replaceChildren();
    hits.replaceChildren();
    searchResults.hidden = true;
    hitUrls.splice(0).forEach((u) => URL.revokeObjectURL(u));
    urls.splice(0).forEach((u) => URL.revokeObjectURL(u));
    okCount = errCount = 0;
    setStatus("");
  });
})();
