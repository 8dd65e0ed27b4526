// The captionbot playground: plain JS, no build step. Talks to the JSON API on this origin.
"use strict";

const $ = (id) => document.getElementById(id);

const LABELS = {
  caption: "caption",
  ocr: "text in the image",
  tags: "hashtags",
  vqa: "answer",
  write: "social caption",
  reimagine: "new image",
};

const MODELS = {
  caption: "caption model",
  ocr: "text reader",
  tags: "hashtag model",
  vqa: "question-answering model",
  write: "writing model",
  reimagine: "image model",
};

const state = {
  describe: null,    // AbortController of the description being streamed
  sha256: null,      // the described image, for ratings
  resultSha256: null,
  editTouched: false,
  original: null,    // object URLs, revoked when replaced
  result: null,
  jobs: [],          // every request in flight, newest last: {task, wait, since}
  ticker: null,
};

// -- messages ------------------------------------------------------------------------------

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").textContent = "";
  $("error").hidden = true;
}

// A live region re-announces whatever is written to it, so only a changed text is written.
function setStatus(text) {
  if ($("status").textContent !== text) $("status").textContent = text;
}

function announce(text) {
  $("announce").textContent = text;
}

// What the status line says about a request: work under way, a model warming up, or the
// request's own place in line. An estimate is shown as it came and dropped once it has
// run out; it never counts up, and the line never counts the user among those ahead.
function statusText(job) {
  const label = LABELS[job.task] || job.task;
  const wait = job.wait;
  if (!wait) return `Working on the ${label}…`;
  const estimate = wait.eta_s !== null && wait.eta_s >= 1 ? wait.eta_s : null;
  const late = estimate !== null && (Date.now() - job.since) / 1000 >= estimate;
  const eta = estimate !== null && !late ? `, about ${Math.round(estimate)} s` : "";
  if (wait.part === "warming_up") {
    const model = MODELS[job.task] || `${label} model`;
    if (wait.eta_s === null) return `Warming up the ${model}; the first start can take a minute…`;
    if (late) return `Warming up the ${model}; it is taking longer than usual…`;
    return `Warming up the ${model}${eta}…`;
  }
  if (late) return `Waiting for the ${label}; it is taking longer than usual…`;
  if (wait.ahead === 0) return `You are next for the ${label}${eta}…`;
  const requests = wait.ahead === 1 ? "1 request is" : `${wait.ahead} requests are`;
  return `${requests} ahead of you for the ${label}${eta}…`;
}

// The status line shows the newest request in flight.
function renderStatus() {
  const job = state.jobs[state.jobs.length - 1];
  setStatus(job ? statusText(job) : "");
}

function track(task) {
  const job = { task, wait: null, since: 0 };
  state.jobs.push(job);
  renderStatus();
  if (state.ticker === null) state.ticker = setInterval(renderStatus, 1000);
  return job;
}

function untrack(job) {
  state.jobs = state.jobs.filter((other) => other !== job);
  if (state.jobs.length === 0) {
    clearInterval(state.ticker);
    state.ticker = null;
  }
  renderStatus();
}

function setWait(job, wait) {
  job.wait = wait;
  job.since = Date.now();
  renderStatus();
}

function working(job, task) {
  job.task = task;
  setWait(job, null);
}

// Where a request about to be sent will stand. Asked before it is sent, the status counts
// only the requests ahead of it; asked later, it would count the request itself.
async function placeInLine(task) {
  try {
    const response = await fetch("/api/status");
    if (!response.ok) return null;
    const now = (await response.json()).tasks[task];
    // The status's guess for a loading model is not a timed load, so it is not shown.
    if (now && now.warming_up) return { part: "warming_up", task, eta_s: null };
    if (now && now.queued > 0) return { part: "waiting", task, ahead: now.queued, eta_s: now.eta_s };
  } catch {
    // The status line is a courtesy; the request itself reports real failures.
  }
  return null;
}

// A pressed button stays focusable while its request runs (aria-disabled, not disabled),
// so keyboard and screen reader users keep their place instead of landing on the body.
function setBusy(buttons, busy) {
  for (const button of buttons) {
    if (busy) button.setAttribute("aria-disabled", "true");
    else button.removeAttribute("aria-disabled");
  }
}

function isBusy(button) {
  return button.getAttribute("aria-disabled") === "true";
}

// -- requests ------------------------------------------------------------------------------

async function call(path, options) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new Error("Could not reach the bot; is it still running?");
  }
  if (!response.ok) {
    let detail = `The bot answered with an error (${response.status}).`;
    try {
      const body = await response.json();
      if (typeof body.detail === "string") detail = body.detail;
    } catch {
      // Not our JSON (a proxy's error page): keep the generic sentence.
    }
    throw new Error(detail);
  }
  return response;
}

async function* ndjson(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).trim();
      buffer = buffer.slice(newline + 1);
      if (line) yield JSON.parse(line);
    }
  }
  if (buffer.trim()) yield JSON.parse(buffer);
}

// -- describe ------------------------------------------------------------------------------

function resetResults() {
  for (const id of ["caption", "ocr", "tags", "social", "answer"]) $(id).textContent = "";
  $("social").setAttribute("aria-busy", "false");
  $("social").removeAttribute("data-state");
  $("edit").value = "";
  state.editTouched = false;
  state.sha256 = null;
  for (const button of document.querySelectorAll("[data-rate]")) {
    button.disabled = true;
    button.setAttribute("aria-pressed", "false");
  }
  $("result").closest("figure").hidden = true;
  setImageReady(false);
}

function setImageReady(ready) {
  $("question").disabled = !ready;
  $("ask").disabled = !ready;
  $("reimagine").disabled = !ready;
}

function enableRating(kind) {
  for (const button of document.querySelectorAll(`[data-rate="${kind}"]`)) {
    button.disabled = false;
    button.setAttribute("aria-pressed", "false");
  }
}

function showOriginal(file) {
  if (state.original) URL.revokeObjectURL(state.original);
  state.original = file ? URL.createObjectURL(file) : null;
  $("original").closest("figure").hidden = !file;
  if (file) {
    $("original").src = state.original;
    $("original").alt = `The image you chose: ${file.name}`;
  } else {
    $("original").removeAttribute("src");
    $("original").alt = "";
  }
}

const handlers = {
  image(part, job) {
    state.sha256 = part.sha256;
    setImageReady(true);
    working(job, "caption");
  },
  waiting(part, job) {
    job.task = part.task;
    setWait(job, part);
  },
  warming_up(part, job) {
    job.task = part.task;
    setWait(job, part);
  },
  caption(part, job) {
    $("caption").textContent = part.text;
    // Once there is a caption, it says what the image shows better than its file name.
    if (part.text) $("original").alt = part.text;
    if (!state.editTouched) $("edit").value = part.text;
    enableRating("caption");
    working(job, "ocr");
  },
  ocr(part, job) {
    $("ocr").textContent = part.text || "(no text found)";
    working(job, "tags");
  },
  tags(part, job) {
    $("tags").textContent = part.hashtags.join(" ");
    working(job, "write");
  },
  social_draft(part) {
    $("social").textContent = part.text;
    $("social").setAttribute("aria-busy", "true");
  },
  social(part) {
    $("social").textContent = part.text;
    $("social").setAttribute("aria-busy", "false");
    $("social").dataset.state = "done";
    enableRating("social");
  },
  unavailable(part) {
    // One part could not be made; the rest of the description still comes.
    const field = { caption: "caption", ocr: "ocr", tags: "tags", social: "social" }[part.of];
    if (field) {
      $(field).textContent = part.detail;
      $(field).setAttribute("aria-busy", "false");
    }
  },
  error(part) {
    showError(part.detail);
  },
};

async function describe(file) {
  if (state.describe) state.describe.abort();
  const controller = new AbortController();
  state.describe = controller;
  clearError();
  const body = new FormData();
  body.append("image", file, file.name);
  const job = track("caption");
  let started = false;
  try {
    const response = await call("/api/describe", {
      method: "POST",
      body,
      signal: controller.signal,
    });
    for await (const part of ndjson(response)) {
      if (!started) {
        // The earlier results stay until this description has begun: a file the bot
        // refuses (not an image, too large) must not cost the user what they had.
        started = true;
        resetResults();
        showOriginal(file);
      }
      const handle = handlers[part.part];
      if (handle) handle(part, job);
    }
  } catch (error) {
    if (error.name === "AbortError") return;
    showError(error.message);
  } finally {
    untrack(job);
    if (state.describe === controller) state.describe = null;
  }
}

// -- ask, reimagine, rate, forget ----------------------------------------------------------

async function ask(event) {
  event.preventDefault();
  if (isBusy($("ask"))) return;
  const question = $("question").value.trim();
  if (!question) {
    showError("Type a question first.");
    return;
  }
  clearError();
  $("answer").textContent = "";
  setBusy([$("ask")], true);
  const body = new FormData();
  body.append("question", question);
  const job = track("vqa");
  try {
    setWait(job, await placeInLine("vqa"));
    const response = await call("/api/ask", { method: "POST", body });
    const { answer } = await response.json();
    $("answer").textContent = answer;
    enableRating("answer");
  } catch (error) {
    showError(error.message);
  } finally {
    untrack(job);
    setBusy([$("ask")], false);
    $("ask").disabled = !state.sha256;
  }
}

async function generate(path, useImage) {
  const buttons = [$("reimagine"), $("imagine")];
  if (buttons.some(isBusy)) return;
  const text = $("edit").value.trim();
  if (!text) {
    showError("Write what the new image should show first.");
    return;
  }
  clearError();
  const body = new FormData();
  body.append("text", text);
  if (useImage) body.append("strength", $("strength").value);
  const seed = $("seed").value.trim();
  if (seed) body.append("seed", seed);
  setBusy(buttons, true);
  announce("");
  const job = track("reimagine");
  try {
    setWait(job, await placeInLine("reimagine"));
    const response = await call(path, { method: "POST", body });
    const blob = await response.blob();
    if (state.result) URL.revokeObjectURL(state.result);
    state.result = URL.createObjectURL(blob);
    state.resultSha256 = response.headers.get("X-Sha256");
    $("result").src = state.result;
    $("result").alt = `Reimagined: ${text}`;
    $("result").closest("figure").hidden = false;
    const [width, height, steps] = ["X-Width", "X-Height", "X-Steps"].map((h) => response.headers.get(h));
    $("result-info").textContent =
      `Reimagined · seed ${response.headers.get("X-Seed")} · ${width}×${height} · ${steps} steps`;
    enableRating("result");
    // Focus stays on the pressed button; a screen reader hears that the image arrived.
    announce(`The new image is ready, made from: ${text}`);
  } catch (error) {
    showError(error.message);
  } finally {
    untrack(job);
    setBusy(buttons, false);
    $("reimagine").disabled = !state.sha256;
  }
}

async function rate(button) {
  const kind = button.dataset.rate;
  const target = {
    caption: [state.sha256, "caption"],
    social: [state.sha256, "write"],
    answer: [state.sha256, "vqa"],
    result: [state.resultSha256, "reimagine"],
  }[kind];
  if (!target || !target[0]) return;
  clearError();
  try {
    await call("/api/rate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sha256: target[0], task: target[1], score: Number(button.dataset.score) }),
    });
    for (const other of document.querySelectorAll(`[data-rate="${kind}"]`)) {
      other.setAttribute("aria-pressed", String(other === button));
    }
  } catch (error) {
    showError(error.message);
  }
}

async function forget() {
  clearError();
  try {
    const response = await call("/api/forget", { method: "POST" });
    const { images } = await response.json();
    if (state.describe) state.describe.abort();
    resetResults();
    showOriginal(null);
    setStatus(`Forgot ${images} image${images === 1 ? "" : "s"} and what was made from them.`);
  } catch (error) {
    showError(error.message);
  }
}

// -- wiring --------------------------------------------------------------------------------

function chooseFile(file) {
  if (file) describe(file);
}

document.addEventListener("DOMContentLoaded", () => {
  const drop = $("drop");
  $("file").addEventListener("change", () => {
    chooseFile($("file").files[0]);
    $("file").value = ""; // choosing the same file again still fires "change"
  });
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    chooseFile(event.dataTransfer.files[0]);
  });
  $("edit").addEventListener("input", () => {
    state.editTouched = true;
  });
  $("ask-form").addEventListener("submit", ask);
  $("reimagine-form").addEventListener("submit", (event) => {
    event.preventDefault();
    generate("/api/reimagine", true);
  });
  $("imagine").addEventListener("click", () => generate("/api/imagine", false));
  for (const button of document.querySelectorAll("[data-rate]")) {
    button.addEventListener("click", () => rate(button));
  }
  $("forget").addEventListener("click", forget);
});
