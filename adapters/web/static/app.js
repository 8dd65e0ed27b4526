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

const state = {
  describe: null,    // AbortController of the description being streamed
  sha256: null,      // the described image, for ratings
  resultSha256: null,
  editTouched: false,
  original: null,    // object URLs, revoked when replaced
  result: null,
  jobs: new Set(),   // {task} of every request in flight, for the status line
  poller: null,
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

function setStatus(text) {
  $("status").textContent = text;
}

function describeWait(task, waiting, own) {
  const label = LABELS[task] || task;
  const eta = waiting.eta_s >= 1 ? `, about ${Math.round(waiting.eta_s)} s` : "";
  if (waiting.warming_up) return `Warming up the ${label} model${eta}…`;
  if (waiting.queued > 0) {
    // A "waiting" part is counted before this request joins the queue; /api/status after.
    return own
      ? `You are number ${waiting.queued + 1} in line for the ${label}${eta}…`
      : `${waiting.queued} in line for the ${label}${eta}…`;
  }
  return `Working on the ${label}…`;
}

// While requests run, the status line shows where the newest one stands.
function track(task) {
  const job = { task };
  state.jobs.add(job);
  setStatus(`Working on the ${LABELS[task] || task}…`);
  if (state.poller === null) state.poller = setInterval(pollStatus, 1000);
  return job;
}

function untrack(job) {
  state.jobs.delete(job);
  if (state.jobs.size === 0) {
    clearInterval(state.poller);
    state.poller = null;
    setStatus("");
  }
}

async function pollStatus() {
  const jobs = [...state.jobs];
  if (jobs.length === 0) return;
  try {
    const response = await fetch("/api/status");
    if (!response.ok) return;
    const { tasks } = await response.json();
    const job = jobs[jobs.length - 1];
    if (state.jobs.has(job) && tasks[job.task]) setStatus(describeWait(job.task, tasks[job.task], false));
  } catch {
    // The status line is a courtesy; the request itself reports real failures.
  }
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
    job.task = "caption";
  },
  waiting(part) {
    setStatus(describeWait(part.task, part, true));
  },
  caption(part, job) {
    $("caption").textContent = part.text;
    if (!state.editTouched) $("edit").value = part.text;
    enableRating("caption");
    job.task = "ocr";
  },
  ocr(part, job) {
    $("ocr").textContent = part.text || "(no text found)";
    job.task = "tags";
  },
  tags(part, job) {
    $("tags").textContent = part.hashtags.join(" ");
    job.task = "write";
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
  error(part) {
    showError(part.detail);
  },
};

async function describe(file) {
  if (state.describe) state.describe.abort();
  const controller = new AbortController();
  state.describe = controller;
  clearError();
  resetResults();
  showOriginal(file);
  const body = new FormData();
  body.append("image", file, file.name);
  const job = track("caption");
  try {
    const response = await call("/api/describe", {
      method: "POST",
      body,
      signal: controller.signal,
    });
    for await (const part of ndjson(response)) {
      const handle = handlers[part.part];
      if (handle) handle(part, job);
    }
  } catch (error) {
    if (error.name === "AbortError") return;
    showError(error.message);
    if (!state.sha256) showOriginal(null);
  } finally {
    untrack(job);
    if (state.describe === controller) state.describe = null;
  }
}

// -- ask, reimagine, rate, forget ----------------------------------------------------------

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question) {
    showError("Type a question first.");
    return;
  }
  clearError();
  $("answer").textContent = "";
  $("ask").disabled = true;
  const body = new FormData();
  body.append("question", question);
  const job = track("vqa");
  try {
    const response = await call("/api/ask", { method: "POST", body });
    const { answer } = await response.json();
    $("answer").textContent = answer;
    enableRating("answer");
  } catch (error) {
    showError(error.message);
  } finally {
    untrack(job);
    $("ask").disabled = !state.sha256;
  }
}

async function generate(path, useImage) {
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
  const buttons = [$("reimagine"), $("imagine")];
  for (const button of buttons) button.disabled = true;
  const job = track("reimagine");
  try {
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
  } catch (error) {
    showError(error.message);
  } finally {
    untrack(job);
    $("imagine").disabled = false;
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
