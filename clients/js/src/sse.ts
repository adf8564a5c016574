/**
 * A Server-Sent Events parser (the WHATWG event-stream format): text in, events out.
 * Comments (`: keepalive`) are skipped; `retry:` is reported apart.
 *
 * @module
 */

/** One dispatched event. */
export interface SseMessage {
  /** `event:`, or `message` when absent. */
  event: string;
  /** The `data:` lines joined by newlines. */
  data: string;
  /** The last event id as of this event (`id:`, kept from earlier events when absent). */
  id: string;
}

/** Feeds text chunks in and calls back for each complete event and each `retry:`. */
export class SseParser {
  private buffer = "";
  private event = "";
  private data: string[] = [];
  private hasData = false;
  private lastId = "";
  private skipLf = false;

  constructor(
    private readonly onMessage: (message: SseMessage) => void,
    private readonly onRetry: (ms: number) => void = () => {},
  ) {}

  /** Parses `chunk`, dispatching every event it completes. */
  push(chunk: string): void {
    let text = this.buffer + chunk;
    if (this.skipLf && text.startsWith("\n")) text = text.slice(1);
    this.skipLf = false;
    let start = 0;
    for (;;) {
      const cr = text.indexOf("\r", start);
      const lf = text.indexOf("\n", start);
      if (cr < 0 && lf < 0) break;
      let end: number;
      let next: number;
      if (cr >= 0 && (lf < 0 || cr < lf)) {
        end = cr;
        if (cr + 1 === text.length) {
          // A CR at the end of the chunk: a LF may follow in the next one.
          next = cr + 1;
          this.skipLf = true;
        } else {
          next = text[cr + 1] === "\n" ? cr + 2 : cr + 1;
        }
      } else {
        end = lf;
        next = lf + 1;
      }
      this.line(text.slice(start, end));
      start = next;
    }
    this.buffer = text.slice(start);
  }

  private line(line: string): void {
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    switch (field) {
      case "event":
        this.event = value;
        break;
      case "data":
        this.data.push(value);
        this.hasData = true;
        break;
      case "id":
        if (!value.includes("\0")) this.lastId = value;
        break;
      case "retry":
        if (/^[0-9]+$/.test(value)) this.onRetry(Number(value));
        break;
      default:
        break;
    }
  }

  private dispatch(): void {
    const event = this.event || "message";
    const data = this.data.join("\n");
    const hasData = this.hasData;
    this.event = "";
    this.data = [];
    this.hasData = false;
    if (hasData) this.onMessage({ event, data, id: this.lastId });
  }
}
