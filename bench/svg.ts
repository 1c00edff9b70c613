// Plain SVG charts for docs/performance.md, written by hand (no chart library): a line chart on log or
// linear axes and a bar chart, each with axes, ticks, labels, a legend and optional goal lines. Text is
// black on white with a system font stack, so GitHub and any browser render them alike.

export interface Series {
  name: string;
  points: [number, number][];
  color: string;
  /** Drawn dashed: the peer. */
  dashed?: boolean;
}

export interface GoalLine {
  y: number;
  label: string;
}

const W = 760;
const FONT = 'font-family="-apple-system, Segoe UI, Helvetica, Arial, sans-serif"';

const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');

/** A number for a tick label: 1.5k, 20k, 2M, 0.5, 150. */
export function short(n: number): string {
  const a = Math.abs(n);
  const f = (x: number, unit: string) => `${+x.toPrecision(3)}${unit}`;
  if (a >= 1e9) return f(n / 1e9, 'G');
  if (a >= 1e6) return f(n / 1e6, 'M');
  if (a >= 1e4) return f(n / 1e3, 'k');
  return `${+n.toPrecision(3)}`;
}

interface Axis {
  min: number;
  max: number;
  log: boolean;
  ticks: number[];
}

function axis(values: number[], log: boolean, fixedTicks?: number[]): Axis {
  const lo = Math.min(...values);
  const hi = Math.max(...values);
  if (fixedTicks) {
    const min = Math.min(lo, ...fixedTicks);
    const max = Math.max(hi, ...fixedTicks);
    return log ? { min: min / 1.25, max: max * 1.25, log, ticks: fixedTicks } : { min: 0, max: max * 1.08, log, ticks: fixedTicks };
  }
  if (log) {
    const a = Math.floor(Math.log10(lo));
    const b = Math.ceil(Math.log10(hi));
    const ticks: number[] = [];
    for (let e = a; e <= b; e++) for (const m of b - a <= 2 ? [1, 2, 5] : [1]) if (m * 10 ** e >= lo / 3 && m * 10 ** e <= hi * 3) ticks.push(m * 10 ** e);
    return { min: Math.min(lo / 1.3, ticks[0] as number), max: Math.max(hi * 1.3, ticks[ticks.length - 1] as number), log, ticks };
  }
  const span = hi <= 0 ? 1 : hi;
  const step0 = 10 ** Math.floor(Math.log10(span / 5));
  const step = [1, 2, 5, 10].map((m) => m * step0).find((s) => span / s <= 6) as number;
  const ticks: number[] = [];
  for (let t = 0; t <= hi * 1.0001 + step; t += step) ticks.push(+t.toPrecision(12));
  return { min: 0, max: ticks[ticks.length - 1] as number, log, ticks };
}

function scale(a: Axis, from: number, to: number): (v: number) => number {
  if (a.log) {
    const l0 = Math.log(a.min);
    const l1 = Math.log(a.max);
    return (v) => from + ((Math.log(v) - l0) / (l1 - l0)) * (to - from);
  }
  return (v) => from + ((v - a.min) / (a.max - a.min)) * (to - from);
}

function legend(items: { name: string; color: string; dashed?: boolean; bar?: boolean }[], x: number, y: number): string {
  return items
    .map((it, i) => {
      const yy = y + i * 18;
      const mark = it.bar
        ? `<rect x="${x}" y="${yy - 9}" width="18" height="11" fill="${it.color}"/>`
        : `<line x1="${x}" y1="${yy - 4}" x2="${x + 18}" y2="${yy - 4}" stroke="${it.color}" stroke-width="2.5"${it.dashed ? ' stroke-dasharray="6 4"' : ''}/>` +
          `<circle cx="${x + 9}" cy="${yy - 4}" r="3.5" fill="${it.color}"/>`;
      return `${mark}<text x="${x + 25}" y="${yy}" font-size="12">${esc(it.name)}</text>`;
    })
    .join('\n');
}

function frame(height: number, title: string, body: string): string {
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${height}" viewBox="0 0 ${W} ${height}" ${FONT}>
<rect width="100%" height="100%" fill="white"/>
<text x="${W / 2}" y="22" font-size="15" font-weight="600" text-anchor="middle">${esc(title)}</text>
${body}
</svg>
`;
}

/** Horizontal grid lines with their labels, and the goal lines, of a y axis between left and right. */
function yGrid(ay: Axis, Y: (v: number) => number, left: number, right: number, goals: readonly GoalLine[] = []): string[] {
  const out: string[] = [];
  for (const t of ay.ticks) {
    const y = Y(t).toFixed(1);
    out.push(`<line x1="${left}" y1="${y}" x2="${right}" y2="${y}" stroke="#e3e3e3"/>`);
    out.push(`<text x="${left - 8}" y="${(+y + 4).toFixed(1)}" font-size="12" text-anchor="end">${short(t)}</text>`);
  }
  for (const g of goals) {
    const y = Y(g.y).toFixed(1);
    out.push(`<line x1="${left}" y1="${y}" x2="${right}" y2="${y}" stroke="#c0392b" stroke-dasharray="2 3"/>`);
    out.push(`<text x="${right - 4}" y="${(+y - 5).toFixed(1)}" font-size="11" fill="#c0392b" text-anchor="end">${esc(g.label)}</text>`);
  }
  return out;
}

/** The two axis lines and the y label. */
function axes(left: number, right: number, top: number, bottom: number, yLabel: string): string {
  const mid = (top + bottom) / 2;
  return (
    `<line x1="${left}" y1="${bottom}" x2="${right}" y2="${bottom}" stroke="#333"/><line x1="${left}" y1="${top}" x2="${left}" y2="${bottom}" stroke="#333"/>` +
    `<text x="18" y="${mid}" font-size="13" text-anchor="middle" transform="rotate(-90 18 ${mid})">${esc(yLabel)}</text>`
  );
}

export interface LineChart {
  title: string;
  xLabel: string;
  yLabel: string;
  series: Series[];
  xLog?: boolean;
  yLog?: boolean;
  /** x ticks to show (default: every x of the data). */
  xTicks?: number[];
  goals?: GoalLine[];
}

export function lineChart(c: LineChart): string {
  const legendRows = c.series.length;
  const H = 380 + legendRows * 18;
  const left = 78;
  const right = W - 24;
  const top = 40;
  const bottom = 320;
  const xs = c.series.flatMap((s) => s.points.map((p) => p[0]));
  const ys = [...c.series.flatMap((s) => s.points.map((p) => p[1])), ...(c.goals ?? []).map((g) => g.y)];
  const ax = axis(xs, c.xLog ?? false, c.xTicks ?? [...new Set(xs)].sort((a, b) => a - b));
  const ay = axis(ys, c.yLog ?? false);
  const X = scale(ax, left, right);
  const Y = scale(ay, bottom, top);
  const out = yGrid(ay, Y, left, right, c.goals);
  for (const t of ax.ticks) {
    const x = X(t).toFixed(1);
    out.push(`<line x1="${x}" y1="${top}" x2="${x}" y2="${bottom}" stroke="#f0f0f0"/>`);
    out.push(`<text x="${x}" y="${bottom + 18}" font-size="12" text-anchor="middle">${short(t)}</text>`);
  }
  out.push(axes(left, right, top, bottom, c.yLabel));
  out.push(`<text x="${(left + right) / 2}" y="${bottom + 40}" font-size="13" text-anchor="middle">${esc(c.xLabel)}</text>`);
  for (const s of c.series) {
    const pts = [...s.points].sort((a, b) => a[0] - b[0]);
    const d = pts.map((p, i) => `${i === 0 ? 'M' : 'L'}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(' ');
    out.push(`<path d="${d}" fill="none" stroke="${s.color}" stroke-width="2.5"${s.dashed ? ' stroke-dasharray="6 4"' : ''}/>`);
    for (const p of pts)
      out.push(
        `<circle cx="${X(p[0]).toFixed(1)}" cy="${Y(p[1]).toFixed(1)}" r="3.5" fill="${s.color}"><title>${esc(`${s.name}: ${short(p[1])} at ${short(p[0])}`)}</title></circle>`,
      );
  }
  out.push(legend(c.series, left + 10, bottom + 66));
  return frame(H, c.title, out.join('\n'));
}

export interface Bar {
  label: string;
  value: number;
  color: string;
}

export interface BarChart {
  title: string;
  yLabel: string;
  bars: Bar[];
  goals?: GoalLine[];
  /** Legend entries (color -> meaning); default none. */
  legend?: { name: string; color: string }[];
}

export function barChart(c: BarChart): string {
  const legendRows = c.legend?.length ?? 0;
  const H = 360 + legendRows * 18;
  const left = 78;
  const right = W - 24;
  const top = 40;
  const bottom = 290;
  const ay = axis([...c.bars.map((b) => b.value), ...(c.goals ?? []).map((g) => g.y)], false);
  const Y = scale(ay, bottom, top);
  const out = yGrid(ay, Y, left, right, c.goals);
  const slot = (right - left) / c.bars.length;
  const bw = Math.min(90, slot * 0.6);
  c.bars.forEach((b, i) => {
    const x = left + slot * i + (slot - bw) / 2;
    const y = Y(b.value);
    out.push(
      `<rect x="${x.toFixed(1)}" y="${y.toFixed(1)}" width="${bw.toFixed(1)}" height="${(bottom - y).toFixed(1)}" fill="${b.color}"><title>${esc(`${b.label}: ${short(b.value)}`)}</title></rect>`,
    );
    out.push(`<text x="${(x + bw / 2).toFixed(1)}" y="${(y - 5).toFixed(1)}" font-size="12" text-anchor="middle">${short(b.value)}</text>`);
    const words = b.label.split(' ');
    const lines: string[] = [];
    for (const w of words) {
      const last = lines[lines.length - 1];
      if (last !== undefined && (last + ' ' + w).length <= Math.max(12, Math.floor(slot / 7))) lines[lines.length - 1] = `${last} ${w}`;
      else lines.push(w);
    }
    lines.forEach((l, k) =>
      out.push(`<text x="${(x + bw / 2).toFixed(1)}" y="${bottom + 16 + k * 14}" font-size="11.5" text-anchor="middle">${esc(l)}</text>`),
    );
  });
  out.push(axes(left, right, top, bottom, c.yLabel));
  if (c.legend)
    out.push(
      legend(
        c.legend.map((l) => ({ ...l, bar: true })),
        left + 10,
        bottom + 70,
      ),
    );
  return frame(H, c.title, out.join('\n'));
}
