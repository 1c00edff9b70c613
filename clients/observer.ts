// An observer (feature DIRTY): follows an address space's dirty pages without mapping its memory. After
// each dirty sync it receives the ranges that were dirty (EV_DIRTY, possibly in several parts).
import { EventEmitter } from 'eventemitter3';
import { Feature, Msg, UnsupportedError, type EvDirty } from '../protocol/index.js';
import { closeAll } from '../transport/index.js';
import { Connection, type BrokerTarget, type ConnectionOptions } from './connection.js';

export interface DirtyEvent {
  /** Which sync (a counter per address space). */
  sync: number;
  ranges: { gpa: number; size: number }[];
}

export class DirtyObserver extends EventEmitter<{ dirty: [event: DirtyEvent] }> {
  private parts: EvDirty[] = [];

  private constructor(private readonly conn: Connection) {
    super();
    conn.on('event', (msg, fds) => {
      closeAll(fds);
      if (msg.t !== Msg.EV_DIRTY) return;
      this.parts.push(msg);
      if (!msg.last) return;
      const parts = this.parts;
      this.parts = [];
      this.emit('dirty', { sync: msg.sync, ranges: parts.flatMap((p) => p.ranges) });
    });
  }

  static async attach(target: BrokerTarget, opts: ConnectionOptions & { space: string; token?: string }): Promise<DirtyObserver> {
    const conn = await Connection.open(target, { name: 'observer', ...opts });
    if ((conn.features & Feature.DIRTY) === 0) {
      conn.close();
      throw new UnsupportedError('the broker does not offer dirty logging (feature DIRTY)');
    }
    try {
      await conn.request({ t: Msg.ATTACH, space: opts.space, role: 'observer', kind: 'observer', ...(opts.token !== undefined ? { token: opts.token } : {}) });
    } catch (err) {
      conn.close();
      throw err;
    }
    return new DirtyObserver(conn);
  }

  close(): void {
    this.conn.close();
  }
}
