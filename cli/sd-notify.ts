// Telling a service manager how the broker is doing (sd_notify(3)): READY=1 once the socket accepts
// clients, STOPPING=1 when shutting down, and WATCHDOG=1 every half of WATCHDOG_USEC while the event loop
// runs (a broker stuck in a loop stops sending and gets restarted). Only when NOTIFY_SOCKET is set; the
// datagram itself is native.notifySend (native/src/notify.c). A failure to notify is logged, never fatal:
// the broker serves whether or not anyone listens.
import { native } from '../native/index.js';

export interface Notifier {
  ready(status: string): void;
  stopping(): void;
  /** Starts WATCHDOG=1 pings when the service manager asked for them; the timer does not hold the loop. */
  startWatchdog(): number | undefined;
  close(): void;
}

export function notifier(warn: (message: string, err: unknown) => void, env: NodeJS.ProcessEnv = process.env): Notifier | undefined {
  const socket = env.NOTIFY_SOCKET;
  if (!socket) return undefined;
  const watchdogUs = Number(env.WATCHDOG_USEC);
  // WATCHDOG_PID, when set, names the process the watchdog is meant for (not a child we started).
  const forUs = env.WATCHDOG_PID === undefined || env.WATCHDOG_PID === String(process.pid);
  let timer: NodeJS.Timeout | undefined;
  const send = (message: string) => {
    try {
      native.notifySend(socket, message);
    } catch (err) {
      warn(`cannot notify the service manager at ${socket} (${message.split('\n')[0]})`, err);
    }
  };
  return {
    ready: (status) => send(`READY=1\nSTATUS=${status}\nMAINPID=${process.pid}`),
    stopping: () => send('STOPPING=1\nSTATUS=shutting down'),
    startWatchdog() {
      if (!forUs || !Number.isSafeInteger(watchdogUs) || watchdogUs <= 0) return undefined;
      const everyMs = Math.max(1, Math.floor(watchdogUs / 2000));
      timer = setInterval(() => send('WATCHDOG=1'), everyMs);
      timer.unref();
      send('WATCHDOG=1');
      return everyMs;
    },
    close() {
      if (timer) clearInterval(timer);
    },
  };
}
