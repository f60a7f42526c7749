// Type declarations of the fedloom JavaScript client (src/index.js).

export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
export type JsonObject = { [key: string]: any };

/** An error answer of the API, or a request that never reached it (status 0, code NETWORK_ERROR). */
/** Uploads of at least this many bytes go through a resumable session by default (64 MiB). */
export const RESUMABLE_THRESHOLD: number;

export interface ResumableOptions {
  /** Bytes per PUT (at most the server's chunk_max_bytes, which is the default). */
  chunkSize?: number;
  /** Failed attempts in a row that move the offset no further before giving up (default 6). */
  maxStalled?: number;
  onProgress?: (progress: { offset: number; size: number }) => void;
  /** The experiment whose task the update answers (a client serving several should name it). */
  experimentId?: string;
  sleep?: (ms: number) => Promise<void>;
}

export class FLAPIError extends Error {
  constructor(fields?: {
    status?: number;
    code?: string;
    message?: string;
    details?: unknown;
    retryAfter?: number | null;
    body?: unknown;
    cause?: unknown;
  });
  /** The HTTP status (0 when the server could not be reached). */
  status: number;
  /** The spec's error code, e.g. UNAUTHORIZED, RATE_LIMITED, INVALID_REQUEST. */
  code: string;
  details: unknown;
  /** Seconds to wait, from Retry-After on a 429; null otherwise. */
  retryAfter: number | null;
  /** The parsed error body, if it was JSON. */
  body: unknown;
}

/** One message of WS /ws/events: the stored event plus its id. */
export interface FLEvent {
  type: string;
  event_id: number;
  timestamp?: string;
  experiment_id?: string;
  client_id?: string;
  round?: number;
  [key: string]: any;
}

export interface ClientOptions {
  /** Replaces the global fetch. */
  fetch?: typeof fetch;
  /** Replaces the WebSocket class (default: the global one, else the `ws` package). */
  WebSocket?: any;
}

export interface RequestOptions {
  query?: Record<string, string | number | boolean | null | undefined>;
  json?: unknown;
  body?: BodyInit;
  headers?: Record<string, string>;
  raw?: boolean;
}

export interface ConnectOptions {
  /** Replay every stored event with a larger event_id first (0: the whole log). */
  since?: number | null;
  onEvent?: (event: FLEvent) => void;
  /** Called each time a connection opens (again, with `resume`). */
  onOpen?: (ws: any) => void;
  onClose?: (event: { code: number; reason: string }) => void;
  /** Reconnect from the last event id after a drop or a 1013 close. */
  resume?: boolean;
  resumeDelayMs?: number;
}

export type ModelFile = Blob | ArrayBuffer | ArrayBufferView;

export class FLAPIClient {
  constructor(serverUrl?: string, apiKey?: string | null, options?: ClientOptions);
  readonly serverUrl: string;
  readonly baseUrl: string;
  readonly apiKey: string | null;
  headers: Record<string, string>;
  /** The open event stream, if any. */
  ws: WebSocket | any | null;
  /** The event_id of the last event received. */
  lastEventId: number | null;

  request<T = any>(method: string, path: string, options?: RequestOptions): Promise<T>;
  errorOf(response: Response): Promise<FLAPIError>;

  getServerStatus(): Promise<JsonObject>;
  getHealth(): Promise<JsonObject>;
  startTraining(experimentConfig: JsonObject): Promise<JsonObject>;
  stopTraining(options?: { experimentId?: string; reason?: string }): Promise<JsonObject>;
  getTrainingStatus(): Promise<JsonObject>;
  getTrainingMetrics(
    experimentId?: string,
    options?: { fromRound?: number; toRound?: number; clientId?: string },
  ): Promise<JsonObject>;

  registerClient(
    clientId: string,
    clientConfig?: JsonObject,
    extra?: { capabilities?: JsonObject; location?: JsonObject },
  ): Promise<JsonObject>;
  listClients(filters?: { status?: string; round?: number; experimentId?: string }): Promise<JsonObject>;
  getClient(clientId: string): Promise<JsonObject>;
  getClientTask(clientId: string, options?: { wait?: number }): Promise<JsonObject>;
  selectClients(options?: { round?: number; policyCheck?: boolean; experimentId?: string }): Promise<JsonObject>;
  getClientMetrics(clientId: string): Promise<JsonObject>;
  revokeClient(clientId: string): Promise<JsonObject>;
  rotateClientKey(clientId: string): Promise<JsonObject>;

  createExperiment(body: JsonObject): Promise<JsonObject>;
  listExperiments(filters?: { status?: string; limit?: number; offset?: number }): Promise<JsonObject>;
  getExperiment(experimentId: string): Promise<JsonObject>;
  continueExperiment(experimentId: string, rounds: number): Promise<JsonObject>;
  /** Files of RESUMABLE_THRESHOLD bytes or more (or with `resumable: true`) go through a resumable session. */
  uploadInitialModel(
    experimentId: string,
    file: ModelFile,
    options?: { resumable?: boolean } & Omit<ResumableOptions, 'experimentId'>,
  ): Promise<JsonObject>;
  /** Chunked upload of the round-0 weights that resumes from the server's committed offset after a drop. */
  uploadInitialModelResumable(
    experimentId: string,
    file: ModelFile,
    options?: Omit<ResumableOptions, 'experimentId'>,
  ): Promise<JsonObject>;
  /** `{upload_id, experiment_id, size, offset, complete, ..., model_id}` of an initial model's resumable upload. */
  getInitialModelSession(experimentId: string, uploadId: string): Promise<JsonObject>;

  getGlobalModel(options?: { round?: number; format?: string; experimentId?: string }): Promise<JsonObject>;
  downloadModel(modelId: string, options?: { format?: string }): Promise<{ data: Uint8Array; sha256: string | null }>;
  /** Files of RESUMABLE_THRESHOLD bytes or more (or with `resumable: true`) go through a resumable session. */
  uploadModelUpdate(
    clientId: string,
    file: ModelFile,
    metrics: JsonObject,
    options?: { filename?: string; resumable?: boolean } & ResumableOptions,
  ): Promise<JsonObject>;
  /** Chunked upload that resumes from the server's committed offset after a dropped connection. */
  uploadModelUpdateResumable(clientId: string, file: ModelFile, metrics: JsonObject, options?: ResumableOptions): Promise<JsonObject>;
  /** `{upload_id, size, offset, complete, chunk_max_bytes, expires_at, ...}` of a resumable upload. */
  getUploadSession(clientId: string, uploadId: string): Promise<JsonObject>;
  getUpdate(updateId: string): Promise<JsonObject>;
  validateModel(clientId: string, file: ModelFile, metrics: JsonObject, options?: { filename?: string }): Promise<JsonObject>;
  submitEvaluation(clientId: string, report: JsonObject): Promise<JsonObject>;

  connectWebSocket(options?: ConnectOptions): WebSocket | any;
  closeWebSocket(): void;
  on(type: string, listener: (event: FLEvent) => void): () => void;
  handleEvent(event: FLEvent): void;
}

export default FLAPIClient;
