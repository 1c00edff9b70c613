// The plain subscriber: maps every region it is given (MAP_SHARED, no pinning) and can read and write
// guest memory through its own mappings. What `mmbroker attach` runs; the base of the device kinds.
import { GuestMemory } from './memory.js';
import { Subscriber, type SubscriberOptions } from './subscriber.js';
import type { BrokerTarget } from './connection.js';

export class MappingSubscriber extends Subscriber {
  protected constructor(
    target: BrokerTarget,
    readonly memory: GuestMemory,
    opts: SubscriberOptions,
  ) {
    super(target, memory, opts);
  }

  static async attach(target: BrokerTarget, opts: SubscriberOptions): Promise<MappingSubscriber> {
    const sub = new MappingSubscriber(target, new GuestMemory(), { kind: 'plain', ...opts });
    await sub.start();
    return sub;
  }
}
