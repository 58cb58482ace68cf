#pragma once
// The models that benchmarks/bench.cpp times, their batches, and the batch
// sizes a run uses (defaults by device kind, --batch).
// benchmarks/python/models.py builds the same architectures in PyTorch; both
// print their parameter counts and benchmarks/python/anchors.py refuses to
// compare models whose counts differ.
//
//   name            model                                             input (per sample)   default batch (GPU / CPU)
//   mlp             784-1024-1024-10 MLP                              784 floats            256 / 256
//   cnn             the quickstart's CNN                              1x28x28               64 / 64
//   transformer     one transformer encoder block, 10-way head        64x256 floats         16 / 16
//   resnet18        ResNet-18 (CIFAR stem: 3x3 conv, no max-pool)     3x32x32               256 / 16
//   transformer-lm  4-layer transformer language model, causal mask   128 tokens of 1000    64 / 4
//
// Every model ends in class scores along its last dimension, and the loss is
// cross-entropy over that dimension (next-token prediction for the language
// model), so one loss function serves them all.

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include <fmt/core.h>
#include <torch/torch.h>

namespace bench {

struct MlpImpl : torch::nn::Cloneable<MlpImpl> {
  MlpImpl() { reset(); }
  void reset() override {
    fc1 = register_module("fc1", torch::nn::Linear(784, 1024));
    fc2 = register_module("fc2", torch::nn::Linear(1024, 1024));
    fc3 = register_module("fc3", torch::nn::Linear(1024, 10));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc3(torch::relu(fc2(torch::relu(fc1(x))))); }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr}, fc3{nullptr};
};
TORCH_MODULE(Mlp);

/// The quickstart's CNN.
struct CnnImpl : torch::nn::Cloneable<CnnImpl> {
  CnnImpl() { reset(); }
  void reset() override {
    conv1 = register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 32, 3).padding(1)));
    conv2 = register_module("conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(32, 64, 3).padding(1)));
    fc1 = register_module("fc1", torch::nn::Linear(64 * 7 * 7, 128));
    fc2 = register_module("fc2", torch::nn::Linear(128, 10));
  }
  torch::Tensor forward(torch::Tensor x) {
    x = torch::max_pool2d(torch::relu(conv1(x)), 2);
    x = torch::max_pool2d(torch::relu(conv2(x)), 2);
    return fc2(torch::relu(fc1(x.flatten(1))));
  }
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(Cnn);

/// One transformer encoder block; takes batch-first input [batch, sequence, features].
struct TransformerImpl : torch::nn::Cloneable<TransformerImpl> {
  TransformerImpl() { reset(); }
  void reset() override {
    layer = register_module(
        "layer", torch::nn::TransformerEncoderLayer(
                     torch::nn::TransformerEncoderLayerOptions(256, 4).dim_feedforward(1024).dropout(0.0)));
    head = register_module("head", torch::nn::Linear(256, 10));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return head(layer(x.transpose(0, 1)).mean(0));  // the layer wants [sequence, batch, features]
  }
  torch::nn::TransformerEncoderLayer layer{nullptr};
  torch::nn::Linear head{nullptr};
};
TORCH_MODULE(Transformer);

/// ResNet's basic block: two 3x3 convolutions with BatchNorm, and a 1x1
/// convolution on the shortcut where the shape changes.
struct BasicBlockImpl : torch::nn::Cloneable<BasicBlockImpl> {
  BasicBlockImpl(std::int64_t in, std::int64_t out, std::int64_t stride) : in_(in), out_(out), stride_(stride) {
    reset();
  }
  void reset() override {
    using torch::nn::Conv2dOptions;
    conv1 = register_module("conv1",
                            torch::nn::Conv2d(Conv2dOptions(in_, out_, 3).stride(stride_).padding(1).bias(false)));
    bn1 = register_module("bn1", torch::nn::BatchNorm2d(out_));
    conv2 = register_module("conv2", torch::nn::Conv2d(Conv2dOptions(out_, out_, 3).padding(1).bias(false)));
    bn2 = register_module("bn2", torch::nn::BatchNorm2d(out_));
    if (stride_ != 1 || in_ != out_) {
      shortcut = register_module(
          "shortcut", torch::nn::Sequential(torch::nn::Conv2d(Conv2dOptions(in_, out_, 1).stride(stride_).bias(false)),
                                            torch::nn::BatchNorm2d(out_)));
    }
  }
  torch::Tensor forward(const torch::Tensor& x) {
    torch::Tensor y = bn2(conv2(torch::relu(bn1(conv1(x)))));
    return torch::relu(y + (shortcut ? shortcut->forward(x) : x));
  }
  std::int64_t in_, out_, stride_;
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr};
  torch::nn::Sequential shortcut{nullptr};
};
TORCH_MODULE(BasicBlock);

/// ResNet-18 for 3x32x32 images: a 3x3 stem (no max-pool), four stages of two
/// basic blocks (64, 128, 256, 512 channels), global average pool, 10 classes.
struct ResNet18Impl : torch::nn::Cloneable<ResNet18Impl> {
  ResNet18Impl() { reset(); }
  void reset() override {
    stem = register_module("stem", torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 64, 3).padding(1).bias(false)));
    bn = register_module("bn", torch::nn::BatchNorm2d(64));
    stages = register_module("stages", torch::nn::Sequential());
    std::int64_t in = 64;
    for (std::int64_t out : {64, 128, 256, 512}) {
      stages->push_back(BasicBlock(in, out, out == 64 ? 1 : 2));
      stages->push_back(BasicBlock(out, out, 1));
      in = out;
    }
    fc = register_module("fc", torch::nn::Linear(512, 10));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    torch::Tensor y = stages->forward(torch::relu(bn(stem(x))));
    return fc(torch::adaptive_avg_pool2d(y, {1, 1}).flatten(1));
  }
  torch::nn::Conv2d stem{nullptr};
  torch::nn::BatchNorm2d bn{nullptr};
  torch::nn::Sequential stages{nullptr};
  torch::nn::Linear fc{nullptr};
};
TORCH_MODULE(ResNet18);

/// A small GPT-like language model: token and position embeddings (256
/// wide), four post-norm encoder layers (4 heads, feed-forward 1024) under a
/// causal mask, and a head over the 1000-token vocabulary. Takes tokens
/// [batch, sequence], returns next-token scores [batch, sequence, vocabulary].
struct TransformerLmImpl : torch::nn::Cloneable<TransformerLmImpl> {
  static constexpr std::int64_t kVocabulary = 1000, kSequence = 128, kWidth = 256, kLayers = 4;
  TransformerLmImpl() { reset(); }
  void reset() override {
    tokens = register_module("tokens", torch::nn::Embedding(kVocabulary, kWidth));
    positions = register_module("positions", torch::nn::Embedding(kSequence, kWidth));
    layers = register_module("layers", torch::nn::ModuleList());
    for (std::int64_t i = 0; i < kLayers; ++i) {
      layers->push_back(torch::nn::TransformerEncoderLayer(
          torch::nn::TransformerEncoderLayerOptions(kWidth, 4).dim_feedforward(1024).dropout(0.0)));
    }
    head = register_module("head", torch::nn::Linear(kWidth, kVocabulary));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    const std::int64_t length = x.size(1);
    const torch::Tensor where = torch::arange(length, x.options());
    torch::Tensor h = (tokens(x) + positions(where)).transpose(0, 1);  // the layers want [sequence, batch, features]
    const torch::Tensor causal =
        torch::full({length, length}, -std::numeric_limits<float>::infinity(), h.options()).triu(1);
    for (const auto& layer : *layers) h = layer->as<torch::nn::TransformerEncoderLayer>()->forward(h, causal);
    return head(h.transpose(0, 1));
  }
  torch::nn::Embedding tokens{nullptr}, positions{nullptr};
  torch::nn::ModuleList layers{nullptr};
  torch::nn::Linear head{nullptr};
};
TORCH_MODULE(TransformerLm);

/// Cross-entropy over the last dimension: [batch, classes] against [batch],
/// or [batch, sequence, vocabulary] against [batch, sequence].
inline torch::Tensor cross_entropy(const torch::Tensor& scores, const torch::Tensor& target) {
  return torch::nll_loss(torch::log_softmax(scores.flatten(0, scores.dim() - 2), -1), target.flatten());
}

/// A model to time: its name (as --models takes it), default batch sizes, and
/// a maker of random batches (on the CPU).
struct Workload {
  std::string name;
  std::string description;
  std::int64_t gpu_batch;
  std::int64_t cpu_batch;
  /// Timed by default on a CPU too; the others are timed by default on GPUs only.
  bool small;
  std::function<torch::data::Example<>(std::int64_t batch)> make_batch;
};

inline const std::vector<Workload>& workloads() {
  using Example = torch::data::Example<>;
  static const std::vector<Workload> all = {
      {"mlp", "784-1024-1024-10 MLP", 256, 256, true,
       [](std::int64_t b) { return Example(torch::randn({b, 784}), torch::randint(10, {b})); }},
      {"cnn", "the quickstart CNN, 1x28x28", 64, 64, true,
       [](std::int64_t b) { return Example(torch::randn({b, 1, 28, 28}), torch::randint(10, {b})); }},
      {"transformer", "one transformer block, 64x256 inputs", 16, 16, true,
       [](std::int64_t b) { return Example(torch::randn({b, 64, 256}), torch::randint(10, {b})); }},
      {"resnet18", "ResNet-18, 3x32x32", 256, 16, false,
       [](std::int64_t b) { return Example(torch::randn({b, 3, 32, 32}), torch::randint(10, {b})); }},
      {"transformer-lm", "4-layer transformer LM, 128 tokens", 64, 4, false,
       [](std::int64_t b) {
         const auto tokens = torch::randint(TransformerLmImpl::kVocabulary, {b, TransformerLmImpl::kSequence + 1});
         return Example(tokens.narrow(1, 0, TransformerLmImpl::kSequence),  // predict each next token
                        tokens.narrow(1, 1, TransformerLmImpl::kSequence).contiguous());
       }},
  };
  return all;
}

/// The models a run times by default: on a CPU the small ones only (CI runs
/// them); on GPUs also ResNet-18 and the language model.
inline std::vector<std::string> default_models(bool gpu) {
  std::vector<std::string> names;
  for (const auto& w : workloads()) {
    if (gpu || w.small) names.push_back(w.name);
  }
  return names;
}

/// Batch sizes by model: the defaults for the device kind (a quarter of them
/// with --quick, but no fewer than the most replicas), then --batch.
inline std::map<std::string, std::int64_t> batch_sizes(bool gpu, bool quick, std::size_t most_replicas,
                                                       const std::map<std::string, std::int64_t>& chosen) {
  std::map<std::string, std::int64_t> out;
  for (const auto& w : workloads()) {
    const std::int64_t batch = gpu ? w.gpu_batch : w.cpu_batch;
    out[w.name] = quick ? std::max<std::int64_t>(batch / 4, static_cast<std::int64_t>(most_replicas)) : batch;
  }
  for (const auto& [name, batch] : chosen) out[name] = batch;
  return out;
}

/// --batch: "N" for every model, or "model=N" for one; later items win.
inline std::map<std::string, std::int64_t> parse_batches(const std::vector<std::string>& items) {
  std::map<std::string, std::int64_t> out;
  auto number = [](const std::string& item, const std::string& text) {
    std::size_t used = 0;
    long long n = 0;
    try {
      n = std::stoll(text, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != text.size() || n < 1) {
      throw std::invalid_argument(fmt::format("--batch {}: {} is not a positive number of samples", item, text));
    }
    return static_cast<std::int64_t>(n);
  };
  for (const auto& item : items) {
    const auto equals = item.find('=');
    if (equals == std::string::npos) {
      for (const auto& w : workloads()) out[w.name] = number(item, item);
      continue;
    }
    const std::string name = item.substr(0, equals);
    const auto& all = workloads();
    if (std::none_of(all.begin(), all.end(), [&](const Workload& w) { return w.name == name; })) {
      std::string known;
      for (const auto& w : all) known += (known.empty() ? "" : ",") + w.name;
      throw std::invalid_argument(fmt::format("--batch {}: no model called {}; models: {}", item, name, known));
    }
    out[name] = number(item, item.substr(equals + 1));
  }
  return out;
}

/// A freshly seeded model: every contender starts from the same weights.
template <class Holder>
Holder make_model() {
  torch::manual_seed(0);
  return Holder();
}

template <class Holder>
struct ModelType {
  using type = Holder;
};

/// Calls `fn(ModelType<Holder>{})` with the module holder of the model called
/// `name` (a name in workloads()).
template <class Fn>
void with_model_type(const std::string& name, Fn&& fn) {
  if (name == "mlp") return fn(ModelType<Mlp>{});
  if (name == "cnn") return fn(ModelType<Cnn>{});
  if (name == "transformer") return fn(ModelType<Transformer>{});
  if (name == "resnet18") return fn(ModelType<ResNet18>{});
  if (name == "transformer-lm") return fn(ModelType<TransformerLm>{});
  throw std::invalid_argument("no model called " + name);
}

/// Trainable parameters (elements), as PyTorch's sum(p.numel() for p in model.parameters()).
inline std::int64_t parameter_count(const torch::nn::Module& module) {
  std::int64_t n = 0;
  for (const auto& p : module.parameters()) n += p.numel();
  return n;
}

}  // namespace bench
