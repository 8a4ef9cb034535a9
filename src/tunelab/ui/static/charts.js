// Training curves with uPlot (vendored, global `uPlot`): a job's live loss and token accuracy,
// and several jobs overlaid. The data comes from /ui/api/jobs/{id}/metrics, which returns only the
// points newer than the last event the page has seen, so polling costs what is new.

const POLL_MS = 2000;
// Steps are whole numbers: no tick at step 1.5.
const STEP_TICKS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000];
const COLORS = ["#3559e0", "#e0573a", "#17a673", "#a23ad6", "#d49a00", "#0891b2"];
const LOSS = [
  ["train_loss", "training loss", "#9db0f5", 1],
  ["valid_loss", "validation loss (sample)", "#e0573a", 2],
  ["full_valid_loss", "full validation loss", "#17a673", 2],
];
const ACCURACY = [
  ["train_mean_token_accuracy", "training token accuracy", "#9db0f5", 1],
  ["valid_mean_token_accuracy", "validation token accuracy", "#e0573a", 2],
  ["full_valid_mean_token_accuracy", "full validation token accuracy", "#17a673", 2],
];

export async function fetchMetrics(jobId, since) {
  const url = `/ui/api/jobs/${encodeURIComponent(jobId)}/metrics` + (since ? `?since=${encodeURIComponent(since)}` : "");
  const response = await fetch(url, { headers: { accept: "application/json" } });
  if (!response.ok) throw new Error((await response.json().catch(() => null))?.error?.message ?? response.statusText);
  return response.json();
}

// TensorBoard's smoothing: an exponential moving average, debiased at the start.
export function smooth(values, weight) {
  if (!weight) return values;
  let last = 0;
  let n = 0;
  return values.map((v) => {
    if (v == null) return null;
    last = last * weight + (1 - weight) * v;
    n += 1;
    return last / (1 - weight ** n);
  });
}

// Epoch ends as light vertical lines, checkpoints as diamonds on the top edge (the best one a star).
function markers(state) {
  return {
    hooks: {
      draw: [
        (u) => {
          const { ctx } = u;
          const { top, height } = u.bbox;
          const dpr = devicePixelRatio;
          ctx.save();
          ctx.font = `${11 * dpr}px system-ui, sans-serif`;
          for (const [i, step] of state.epochs.entries()) {
            const x = Math.round(u.valToPos(step, "x", true));
            ctx.strokeStyle = "#c3c8d4";
            ctx.setLineDash([4 * dpr, 4 * dpr]);
            ctx.beginPath();
            ctx.moveTo(x, top);
            ctx.lineTo(x, top + height);
            ctx.stroke();
            ctx.fillStyle = "#8a93a6";
            ctx.fillText(`epoch ${i + 1}`, x - 44 * dpr, top + height - 6 * dpr);
          }
          ctx.setLineDash([]);
          for (const ckpt of state.checkpoints) {
            const x = u.valToPos(ckpt.step, "x", true);
            ctx.fillStyle = ckpt.best ? "#d4a000" : "#3559e0";
            ctx.font = `${(ckpt.best ? 16 : 13) * dpr}px system-ui, sans-serif`;
            ctx.fillText(ckpt.best ? "★" : "◆", x - 6 * dpr, top + 14 * dpr);
          }
          ctx.restore();
        },
      ],
      ready: [
        (u) => {
          // A click near a checkpoint marker selects that checkpoint in the table.
          u.over.addEventListener("click", (event) => {
            let nearest = null;
            for (const ckpt of state.checkpoints) {
              const distance = Math.abs(u.valToPos(ckpt.step, "x") - event.offsetX);
              if (distance < 12 && (!nearest || distance < nearest.distance)) nearest = { ckpt, distance };
            }
            if (nearest) document.dispatchEvent(new CustomEvent("checkpoint-select", { detail: nearest.ckpt }));
          });
        },
      ],
    },
  };
}

function chartOptions(el, title, lines, log, state, sync) {
  return {
    title,
    width: el.clientWidth || 600,
    height: 250,
    cursor: { sync: { key: sync } },
    scales: { x: { time: false }, y: log ? { distr: 3 } : {} },
    axes: [{ label: "step", incrs: STEP_TICKS }, {}],
    series: [{ label: "step" }, ...lines],
    plugins: [markers(state)],
  };
}

class JobChart {
  constructor(root) {
    this.root = root;
    this.jobId = root.dataset.jobChart;
    this.state = { epochs: [], checkpoints: [] };
    this.columns = null;
    this.since = null;
    this.charts = [];
    this.controls = document.querySelector(root.dataset.controls || "#chart-controls");
    this.controls?.addEventListener("input", () => this.draw(true));
    window.addEventListener("resize", () => this.charts.forEach((c, i) => c.setSize({ width: this.boxes[i].clientWidth, height: 250 })));
    this.poll();
  }

  async poll() {
    try {
      const data = await fetchMetrics(this.jobId, this.since);
      this.since = data.since;
      this.merge(data);
      this.draw(false);
      if (data.finished) return;
    } catch (error) {
      this.root.dataset.error = error.message;
    }
    setTimeout(() => this.poll(), POLL_MS);
  }

  merge(data) {
    if (!this.columns) this.columns = data.series;
    else for (const [name, values] of Object.entries(data.series)) this.columns[name].push(...values);
    this.totalSteps = data.total_steps ?? this.totalSteps;
    const epochs = data.n_epochs;
    this.state.epochs = this.totalSteps && epochs ? Array.from({ length: epochs }, (_, i) => ((i + 1) * this.totalSteps) / epochs) : [];
    this.state.checkpoints = data.checkpoints;
    this.root.dataset.points = this.columns.step.length;
    this.root.dataset.status = data.status;
  }

  draw(rebuild) {
    const cols = this.columns;
    if (!cols || cols.step.length === 0) {
      this.root.querySelector(".empty").hidden = false;
      return;
    }
    this.root.querySelector(".empty").hidden = true;
    const log = this.controls?.querySelector("[name=log]")?.checked ?? false;
    const weight = Number(this.controls?.querySelector("[name=smoothing]")?.value ?? 0);
    const output = this.controls?.querySelector("output");
    if (output) output.textContent = weight.toFixed(2);
    const present = (specs) => specs.filter(([name]) => cols[name].some((v) => v != null));
    const series = (specs) =>
      specs.map(([name, label, stroke, width]) => ({ label, stroke, width, spanGaps: true, points: { show: name !== "train_loss" && name !== "train_mean_token_accuracy" } }));
    const loss = present(LOSS);
    const accuracy = present(ACCURACY);
    const smoothed = { label: `training loss (smoothed ${weight.toFixed(2)})`, stroke: "#3559e0", width: 2 };
    const lossData = [cols.step, ...loss.map(([name]) => cols[name]), smooth(cols.train_loss, weight)];
    const accuracyData = [cols.step, ...accuracy.map(([name]) => cols[name])];
    const signature = JSON.stringify([loss.length, accuracy.length, log, weight > 0]);
    if (rebuild || signature !== this.signature) {
      this.charts.forEach((c) => c.destroy());
      this.boxes = [this.root.querySelector("[data-loss]"), this.root.querySelector("[data-accuracy]")];
      const lossSeries = [...series(loss), weight > 0 ? smoothed : { ...smoothed, show: false }];
      this.charts = [
        new uPlot(chartOptions(this.boxes[0], "Loss", lossSeries, log, this.state, this.jobId), lossData, this.boxes[0]),
        new uPlot(chartOptions(this.boxes[1], "Token accuracy", series(accuracy), false, this.state, this.jobId), accuracyData, this.boxes[1]),
      ];
      this.signature = signature;
    } else {
      this.charts[0].setData(lossData);
      this.charts[1].setData(accuracyData);
    }
  }
}

// Several jobs overlaid: each job's training loss (thin) and validation loss (thick), on one step axis.
class CompareChart {
  constructor(root) {
    this.root = root;
    this.jobs = JSON.parse(root.dataset.compareChart);
    this.load();
  }

  async load() {
    const all = await Promise.all(this.jobs.map((job) => fetchMetrics(job.id)));
    const steps = [...new Set(all.flatMap((d) => d.series.step))].sort((a, b) => a - b);
    const data = [steps];
    const series = [{ label: "step" }];
    all.forEach((d, i) => {
      const at = new Map(d.series.step.map((s, k) => [s, k]));
      const column = (name) => steps.map((s) => (at.has(s) ? d.series[name][at.get(s)] : null));
      const valid = d.series.full_valid_loss.some((v) => v != null) ? "full_valid_loss" : "valid_loss";
      const color = COLORS[i % COLORS.length];
      data.push(column("train_loss"), column(valid));
      series.push(
        { label: `${this.jobs[i].label} training`, stroke: color, width: 1, spanGaps: true },
        { label: `${this.jobs[i].label} ${valid.replaceAll("_", " ")}`, stroke: color, width: 2.5, dash: [6, 4], spanGaps: true, points: { show: true } },
      );
    });
    const box = this.root.querySelector("[data-loss]");
    this.root.querySelector(".empty").hidden = steps.length > 0;
    if (steps.length) {
      const options = { title: "Loss", width: box.clientWidth || 800, height: 320, scales: { x: { time: false } }, axes: [{ label: "step", incrs: STEP_TICKS }, {}], series };
      new uPlot(options, data, box);
    }
    this.root.dataset.points = steps.length;
    if (all.some((d) => !d.finished)) setTimeout(() => { box.replaceChildren(); this.load(); }, 3 * POLL_MS);
  }
}

for (const root of document.querySelectorAll("[data-job-chart]")) new JobChart(root);
for (const root of document.querySelectorAll("[data-compare-chart]")) new CompareChart(root);

// Selecting a checkpoint (on the chart) highlights its row, also after the polled table is replaced.
let selected = null;
function highlight(scroll) {
  document.querySelectorAll("tr.selected").forEach((r) => r.classList.remove("selected"));
  const row = selected && document.getElementById(`ckpt-${selected}`);
  if (!row) return;
  row.classList.add("selected");
  if (scroll) row.scrollIntoView({ block: "center", behavior: "smooth" });
}
document.addEventListener("checkpoint-select", (event) => {
  selected = event.detail.step;
  highlight(true);
});
document.addEventListener("htmx:afterSwap", () => highlight(false));
