// vitlab serve's page: sends each dropped, chosen or pasted image to POST /v1/predict with the
// attention overlay, and draws the answer in a card: top-5 bars, the overlay, the timing.
// Text from the server or from file names is only ever set as textContent, never as HTML.
"use strict";

const TOP_K = 5;  // or every class, for a model with fewer
const drop = document.getElementById("drop");
const input = document.getElementById("files");
const results = document.getElementById("results");
const template = document.getElementById("card");

function percent(p) {
  return `${(100 * p).toFixed(p >= 0.1 ? 1 : 2)}%`;
}

// the model card: asked once, awaited by the header and by every request (for the class count)
const modelCard = fetch("/v1/model").then((response) => response.json());

async function showModel() {
  const line = document.getElementById("model");
  try {
    const card = await modelCard;
    const a = card.architecture;
    const params = (a.parameters / 1e6).toFixed(1);
    const accuracy = card.accuracy.val_top1 != null
      ? ` · validation top-1 ${percent(card.accuracy.val_top1)}` : "";
    line.textContent = `ViT ${a.depth} blocks × ${a.dim} wide, ${params}M parameters, ` +
      `${card.preprocessing.image_size.join("×")} input · ${card.classes.length} classes` +
      `${accuracy} · ${card.precision} inference`;
    line.title = `classes: ${card.classes.join(", ")}`;
    const [height, width] = card.preprocessing.image_size;
    document.documentElement.style.setProperty("--aspect", String(width / height));
    document.getElementById("hint").textContent =
      `Classes: ${card.classes.join(", ")}. Any size is scaled and centre-cropped to ` +
      `${card.preprocessing.image_size.join("×")}.`;
  } catch (error) {
    line.textContent = `cannot reach the model card: ${error.message}`;
  }
}

function drawBars(list, predictions) {
  for (const { class: name, probability } of predictions) {
    const item = document.createElement("li");
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = name;
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${Math.max(0.5, 100 * probability)}%`;
    bar.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = percent(probability);
    item.append(label, bar, value);
    list.append(item);
  }
}

async function classify(file) {
  const card = template.content.firstElementChild.cloneNode(true);
  card.querySelector(".name").textContent = file.name || "pasted image";
  const original = card.querySelector(".original");
  original.src = URL.createObjectURL(file);
  results.prepend(card);

  const body = new FormData();
  body.append("image", file, file.name || "pasted.png");
  body.append("attention", "true");
  const started = performance.now();
  try {
    body.append("top_k", String(Math.min(TOP_K, (await modelCard).classes.length)));
    const response = await fetch("/v1/predict", { method: "POST", body });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
    const [result] = answer.results;
    drawBars(card.querySelector(".bars"), result.predictions);
    card.querySelector(".overlay").src = `data:image/png;base64,${result.attention_png}`;
    const batch = result.batch_size > 1 ? ` in a batch of ${result.batch_size}` : "";
    card.querySelector(".time").textContent =
      `model ${result.model_ms.toFixed(1)} ms${batch} · round trip ${(performance.now() - started).toFixed(0)} ms`;
    card.dataset.state = "done";
  } catch (error) {
    card.querySelector(".error").textContent = error.message;
    card.querySelector(".time").textContent = "";
    card.dataset.state = "error";
  }
}

function classifyAll(fileList) {
  for (const file of fileList) classify(file);
}

input.addEventListener("change", () => {
  classifyAll(input.files);
  input.value = "";  // choosing the same file again fires change again
});

for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
}
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  classifyAll(event.dataTransfer.files);
});
// a file dropped beside the zone would make the browser navigate away to it
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => event.preventDefault());

document.addEventListener("paste", (event) => {
  const images = [...event.clipboardData.files].filter((file) => file.type.startsWith("image/"));
  if (images.length) classifyAll(images);
});

showModel();
