// Watch events and history entries in words, one line each (`mmbroker watch`, `history`, `map add`).
import type { ChangeOp, ClientRef, CommitOp, ErrorBodyWire, EvWatch, HistoryEntry } from '../protocol/index.js';
import { formatSize, hex } from './args.js';

export const who = (c: ClientRef): string => `${c.kind} client ${JSON.stringify(c.name)} (#${c.id}, pid ${c.pid})`;

const flags = (r: { readonly: boolean; logDirty: boolean }) => [r.readonly ? 'ro' : 'rw', r.logDirty ? 'log' : ''].filter(Boolean).join(',');

/** "+ dimm0 0x100000000 2 MiB rw", "- dimm0 0x100000000 2 MiB", "~ ram ro,log". */
export function describeChange(op: ChangeOp): string {
  const r = op.region;
  if (op.op === 'set') return `~ ${r.name} ${flags(r)}`;
  return `${op.op === 'add' ? '+' : '-'} ${r.name} ${hex(r.gpa)} ${formatSize(r.size)}${op.op === 'add' ? ` ${flags(r)}` : ''}`;
}

/** A requested op (a refused transaction never got planned): as the owner sent it. */
export function describeRequest(op: CommitOp): string {
  if (op.op === 'add') return `+ ${op.name} ${hex(op.gpa)} ${formatSize(op.size)} ${flags({ readonly: op.readonly ?? false, logDirty: op.logDirty ?? false })}`;
  if (op.op === 'remove') return `- ${String(op.region)}`;
  return `~ ${String(op.region)}${op.readonly !== undefined ? ` ${op.readonly ? 'ro' : 'rw'}` : ''}${op.logDirty !== undefined ? ` log=${op.logDirty}` : ''}`;
}

export function describeChanges(ops: readonly ChangeOp[], total: number): string {
  const more = total > ops.length ? `; and ${total - ops.length} more` : '';
  return ops.map(describeChange).join('; ') + more;
}

export function describeError(e: ErrorBodyWire): string {
  return `${e.code}${e.client ? ` by ${who(e.client)}` : ''}: ${e.message}`;
}

export const duration = (us: number): string => (us < 1000 ? `${us} us` : us < 1_000_000 ? `${(us / 1000).toFixed(1)} ms` : `${(us / 1e6).toFixed(2)} s`);

/** "committed", "rolled back", "refused". */
export const outcomeWord = (o: HistoryEntry['outcome']): string => (o === 'rolled-back' ? 'rolled back' : o);

/** A history entry's changes, or what was asked for when it was refused before planning. */
export function entryChanges(e: HistoryEntry): string {
  if (e.ops.length > 0) return describeChanges(e.ops, e.opsTotal);
  const asked = (e.request ?? []).map(describeRequest).join('; ');
  return asked + (e.opsTotal > (e.request ?? []).length ? `; and ${e.opsTotal - (e.request ?? []).length} more` : '');
}

/** One EV_WATCH in words (without time and space, which the caller prints). */
export function describeEvent(m: EvWatch): { kind: string; text: string } {
  const e = m.event;
  switch (e.kind) {
    case 'txn':
      return {
        kind: 'txn',
        text: `generation ${e.generation} to the vote${e.attempt > 1 ? ` (attempt ${e.attempt})` : ''}, from ${who(e.owner)}: ${describeChanges(e.ops, e.opsTotal)}`,
      };
    case 'outcome': {
      const x = e.entry;
      const err = x.error ? `: ${describeError(x.error)}` : '';
      return {
        kind: outcomeWord(x.outcome),
        text: `generation ${x.generation} ${outcomeWord(x.outcome)} in ${duration(x.us)}${x.outcome === 'refused' ? ` (${entryChanges(x)})` : ''}${err}`,
      };
    }
    case 'joined':
      return { kind: 'joined', text: `${who(e.client)} joined as ${e.role}` };
    case 'left':
      return { kind: 'left', text: `${who(e.client)} left (${e.role}, ${e.reason})` };
    case 'evicted':
      return { kind: 'evicted', text: `${who(e.client)} evicted: ${describeError(e.error)}` };
    case 'holder':
      return {
        kind: 'holder',
        text: `${who(e.client)} may still reach backings ${e.backings.join(', ')} (${e.reason}, ${e.state}${e.alive.length > 0 ? `; alive: ${e.alive.join(', ')}` : ''}): a holder until fenced`,
      };
    case 'fenced':
      return { kind: 'fenced', text: `${who(e.client)} fenced (${e.how}) ${e.ms} ms after its connection ended` };
    case 'dirty-sync':
      return {
        kind: 'dirty-sync',
        text: `${e.regions} region(s), ${e.dirty} dirty page(s) (${formatSize(e.dirty * 4096)}), ${formatSize(e.bytes)} of bitmap, in ${duration(e.us)}`,
      };
    case 'published':
      return { kind: 'published', text: `published at generation ${e.generation}` };
    case 'pinned':
      return { kind: 'pinned', text: `${who(e.client)} has pinned ${formatSize(e.pinned)} (broker predicts ${formatSize(e.predicted)} for the committed map)` };
  }
}

const pad = (n: number, w = 2) => String(n).padStart(w, '0');

/** "23:19:45.123" in local time. */
export function clock(ms: number): string {
  const d = new Date(ms);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

/** "2026-12-07 23:19:45.123" in local time. */
export function stamp(ms: number): string {
  const d = new Date(ms);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${clock(ms)}`;
}
