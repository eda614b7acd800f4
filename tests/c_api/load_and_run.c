/* Loads a SavedModel the way TF Serving does (C++ LoadSavedModel, reached
 * through the TensorFlow C API) and runs requests read from a file.
 *
 * Usage: load_and_run EXPORT_DIR REQUEST_FILE
 *
 * REQUEST_FILE is whitespace-separated tokens (float32 / int32 inputs only):
 *   <num_requests>
 *   then per request:
 *     <label> <num_inputs> <num_outputs>
 *     per input:  <tensor_name> <float|int32> <ndims> <dim>... <value>...
 *     per output: <tensor_name>
 * Tensor names are graph tensor names, "operation:index" (the SavedModel's
 * signature_def names).
 *
 * All requests run in ONE session, in order. Output on stdout, one line each:
 *   LOADED
 *   REQUEST <label> OK <num_outputs>
 *   OUTPUT <index> <float|int32> <ndims> <dim>... <value>...   (%.9g)
 *   REQUEST <label> ERROR <code> <CODE_NAME> <message, newlines as \n>
 * Exit status 0 when the file was processed (request errors included), 1 on
 * a usage, parse, load or graph error.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tensorflow/c/c_api.h"

#define MAX_TENSORS 64
#define MAX_NAME 1024

static const char *code_name(TF_Code code) {
  switch (code) {
    case TF_OK: return "OK";
    case TF_CANCELLED: return "CANCELLED";
    case TF_UNKNOWN: return "UNKNOWN";
    case TF_INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case TF_DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case TF_NOT_FOUND: return "NOT_FOUND";
    case TF_ALREADY_EXISTS: return "ALREADY_EXISTS";
    case TF_PERMISSION_DENIED: return "PERMISSION_DENIED";
    case TF_RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case TF_FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case TF_ABORTED: return "ABORTED";
    case TF_OUT_OF_RANGE: return "OUT_OF_RANGE";
    case TF_UNIMPLEMENTED: return "UNIMPLEMENTED";
    case TF_INTERNAL: return "INTERNAL";
    case TF_UNAVAILABLE: return "UNAVAILABLE";
    case TF_DATA_LOSS: return "DATA_LOSS";
    case TF_UNAUTHENTICATED: return "UNAUTHENTICATED";
    default: return "UNRECOGNIZED";
  }
}

static void print_message(const char *message) {
  for (const char *p = message; *p; ++p) {
    if (*p == '\n') {
      fputs("\\n", stdout);
    } else if (*p != '\r') {
      fputc(*p, stdout);
    }
  }
  fputc('\n', stdout);
}

static int die(const char *what, TF_Status *status) {
  fprintf(stderr, "load_and_run: %s", what);
  if (status != NULL) {
    fprintf(stderr, ": %s (%s)", TF_Message(status), code_name(TF_GetCode(status)));
  }
  fputc('\n', stderr);
  return 1;
}

/* Resolves "operation:index" in the graph. */
static int lookup(TF_Graph *graph, const char *tensor_name, TF_Output *out) {
  char op_name[MAX_NAME];
  const char *colon = strrchr(tensor_name, ':');
  size_t length = colon ? (size_t)(colon - tensor_name) : strlen(tensor_name);
  if (length == 0 || length >= sizeof(op_name)) return 0;
  memcpy(op_name, tensor_name, length);
  op_name[length] = '\0';
  out->oper = TF_GraphOperationByName(graph, op_name);
  out->index = colon ? atoi(colon + 1) : 0;
  if (out->oper == NULL) {
    fprintf(stderr, "load_and_run: no operation %s in the graph\n", op_name);
    return 0;
  }
  if (out->index < 0 || out->index >= TF_OperationNumOutputs(out->oper)) {
    fprintf(stderr, "load_and_run: %s has no output %d\n", op_name, out->index);
    return 0;
  }
  return 1;
}

static TF_Tensor *read_tensor(FILE *in) {
  char type[16];
  int ndims;
  int64_t dims[16];
  int64_t count = 1;
  if (fscanf(in, "%15s %d", type, &ndims) != 2 || ndims < 0 || ndims > 16) return NULL;
  for (int d = 0; d < ndims; ++d) {
    long long dim;
    if (fscanf(in, "%lld", &dim) != 1 || dim < 0) return NULL;
    dims[d] = (int64_t)dim;
    count *= dims[d];
  }
  if (strcmp(type, "float") == 0) {
    TF_Tensor *t = TF_AllocateTensor(TF_FLOAT, dims, ndims, (size_t)count * sizeof(float));
    float *data = (float *)TF_TensorData(t);
    for (int64_t i = 0; i < count; ++i) {
      if (fscanf(in, "%f", &data[i]) != 1) { TF_DeleteTensor(t); return NULL; }
    }
    return t;
  }
  if (strcmp(type, "int32") == 0) {
    TF_Tensor *t = TF_AllocateTensor(TF_INT32, dims, ndims, (size_t)count * sizeof(int32_t));
    int32_t *data = (int32_t *)TF_TensorData(t);
    for (int64_t i = 0; i < count; ++i) {
      if (fscanf(in, "%d", &data[i]) != 1) { TF_DeleteTensor(t); return NULL; }
    }
    return t;
  }
  fprintf(stderr, "load_and_run: unsupported dtype %s (float and int32 only)\n", type);
  return NULL;
}

static int print_tensor(int index, const TF_Tensor *t) {
  int ndims = TF_NumDims(t);
  int64_t count = TF_TensorElementCount(t);
  TF_DataType type = TF_TensorType(t);
  if (type != TF_FLOAT && type != TF_INT32) {
    fprintf(stderr, "load_and_run: output %d has unsupported dtype %d\n", index, (int)type);
    return 0;
  }
  printf("OUTPUT %d %s %d", index, type == TF_FLOAT ? "float" : "int32", ndims);
  for (int d = 0; d < ndims; ++d) printf(" %lld", (long long)TF_Dim(t, d));
  for (int64_t i = 0; i < count; ++i) {
    if (type == TF_FLOAT) {
      printf(" %.9g", (double)((const float *)TF_TensorData(t))[i]);
    } else {
      printf(" %d", ((const int32_t *)TF_TensorData(t))[i]);
    }
  }
  putchar('\n');
  return 1;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s EXPORT_DIR REQUEST_FILE\n", argv[0]);
    return 1;
  }
  FILE *in = fopen(argv[2], "r");
  if (in == NULL) return die("cannot open the request file", NULL);

  TF_Status *status = TF_NewStatus();
  TF_Graph *graph = TF_NewGraph();
  TF_SessionOptions *options = TF_NewSessionOptions();
  const char *tags[] = {"serve"};
  TF_Session *session = TF_LoadSessionFromSavedModel(options, NULL, argv[1], tags, 1, graph,
                                                     NULL, status);
  TF_DeleteSessionOptions(options);
  if (TF_GetCode(status) != TF_OK) return die("TF_LoadSessionFromSavedModel failed", status);
  printf("LOADED\n");
  fflush(stdout);

  int num_requests;
  if (fscanf(in, "%d", &num_requests) != 1) return die("bad request file header", NULL);
  for (int r = 0; r < num_requests; ++r) {
    char label[MAX_NAME], name[MAX_NAME];
    int num_inputs, num_outputs;
    TF_Output inputs[MAX_TENSORS], outputs[MAX_TENSORS];
    TF_Tensor *input_values[MAX_TENSORS];
    TF_Tensor *output_values[MAX_TENSORS] = {NULL};
    if (fscanf(in, "%1023s %d %d", label, &num_inputs, &num_outputs) != 3 || num_inputs < 0 ||
        num_inputs > MAX_TENSORS || num_outputs < 0 || num_outputs > MAX_TENSORS) {
      return die("bad request header", NULL);
    }
    for (int i = 0; i < num_inputs; ++i) {
      if (fscanf(in, "%1023s", name) != 1 || !lookup(graph, name, &inputs[i])) {
        return die("bad input name", NULL);
      }
      input_values[i] = read_tensor(in);
      if (input_values[i] == NULL) return die("bad input tensor", NULL);
    }
    for (int i = 0; i < num_outputs; ++i) {
      if (fscanf(in, "%1023s", name) != 1 || !lookup(graph, name, &outputs[i])) {
        return die("bad output name", NULL);
      }
    }

    TF_SessionRun(session, NULL, inputs, input_values, num_inputs, outputs, output_values,
                  num_outputs, NULL, 0, NULL, status);

    if (TF_GetCode(status) == TF_OK) {
      printf("REQUEST %s OK %d\n", label, num_outputs);
      for (int i = 0; i < num_outputs; ++i) {
        if (!print_tensor(i, output_values[i])) return 1;
      }
    } else {
      printf("REQUEST %s ERROR %d %s ", label, (int)TF_GetCode(status),
             code_name(TF_GetCode(status)));
      print_message(TF_Message(status));
    }
    fflush(stdout);
    for (int i = 0; i < num_inputs; ++i) TF_DeleteTensor(input_values[i]);
    for (int i = 0; i < num_outputs; ++i) {
      if (output_values[i] != NULL) TF_DeleteTensor(output_values[i]);
    }
  }
  fclose(in);

  TF_CloseSession(session, status);
  if (TF_GetCode(status) != TF_OK) return die("TF_CloseSession failed", status);
  TF_DeleteSession(session, status);
  if (TF_GetCode(status) != TF_OK) return die("TF_DeleteSession failed", status);
  TF_DeleteGraph(graph);
  TF_DeleteStatus(status);
  return 0;
}
