// Builds broken variants of a model folder for the command-line cases of the hostile suite. Each variant
// links every file of the shipped model and replaces exactly one:
//   nested_config    transformer/config.json: "num_layers" nested 100000 arrays deep
//   nested_header    transformer weights: a 200 KB header whose first shape is nested 100000 deep
//   nan_transformer  transformer weights: one NaN in transformer_blocks.2.ff.net.2.weight
//   nan_classifier   classifier.safetensors: one +inf in conv1.weight
//   fifo_config      transformer/config.json is a FIFO (reading it must not block)
//   dir_weights      transformer weights are a directory
//   huge_sample      transformer/config.json: sample_size 16384 (workspaces far beyond any machine)
// Round 2 (issue 28):
//   sibling_sampling sampling.json: the guidance scale and 100,000 sibling objects {"k0":{},...} (1.2 MB)
//   overflow_sample  transformer/config.json: sample_size 65536 (int products overflowed in the demo)
//   small_sample     transformer/config.json: sample_size 16, the classifier takes 32 x 32
//   class_number     transformer/config.json: "_class_name": 7
//   padded_classifier classifier.json: conv1 "padding": 4096
//   absurd_learned   learned_c3.json: one weight 1e30
// Usage: hostile_make_models <model folder> <output folder>
#include <cstdio>
#include <exception>
#include <limits>

#include "hostile_inputs.hpp"

int main(int argc, char** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: hostile_make_models <model folder> <output folder>\n");
        return 2;
    }
    try {
        namespace fs = std::filesystem;
        const fs::path model = argv[1], out = hostile::fresh_dir(argv[2]);
        const auto variant = [&](const char* name) {
            const auto dir = out / name;
            hostile::link_tree(model, dir);
            return dir;
        };
        const std::string config = hostile::read_text(model / "transformer" / "config.json");
        const auto with_config = [&](const fs::path& dir, const std::string& key, const std::string& value) {
            const auto at = config.find("\"" + key + "\"");
            const auto colon = config.find(':', at), end = config.find_first_of(",}", colon);
            fs::remove(dir / "transformer" / "config.json");
            hostile::write_text(dir / "transformer" / "config.json",
                                config.substr(0, colon + 1) + " " + value + config.substr(end));
        };
        const fs::path weights = fs::path("transformer") / "diffusion_pytorch_model.safetensors";

        with_config(variant("nested_config"), "num_layers", hostile::nested_arrays(100000));

        const auto nested_header = variant("nested_header");
        fs::remove(nested_header / weights);
        hostile::write_raw_safetensors(nested_header / weights, R"({"w":{"dtype":"F32","shape":)" +
                                                                    hostile::nested_arrays(100000) +
                                                                    R"(,"data_offsets":[0,4]}})",
                                       4);

        const auto nan_transformer = variant("nan_transformer");
        hostile::make_private_copy(nan_transformer / weights);
        hostile::poke_float(nan_transformer / weights, "transformer_blocks.2.ff.net.2.weight", 7,
                            std::numeric_limits<float>::quiet_NaN());

        const auto nan_classifier = variant("nan_classifier");
        hostile::make_private_copy(nan_classifier / "classifier.safetensors");
        hostile::poke_float(nan_classifier / "classifier.safetensors", "conv1.weight", 3,
                            std::numeric_limits<float>::infinity());

        const auto fifo_config = variant("fifo_config");
        hostile::make_fifo(fifo_config / "transformer" / "config.json");

        const auto dir_weights = variant("dir_weights");
        fs::remove(dir_weights / weights);
        fs::create_directory(dir_weights / weights);

        with_config(variant("huge_sample"), "sample_size", "16384");

        with_config(variant("overflow_sample"), "sample_size", "65536");
        with_config(variant("small_sample"), "sample_size", "16");
        with_config(variant("class_number"), "_class_name", "7");
        {
            const auto dir = variant("sibling_sampling");
            const std::string sampling = hostile::read_text(model / "sampling.json");
            std::string text = sampling.substr(0, sampling.rfind('}'));
            for (int i = 0; i < 100000; ++i) text += ", \"k" + std::to_string(i) + "\": {}";
            fs::remove(dir / "sampling.json");
            hostile::write_text(dir / "sampling.json", text + "}\n");
        }
        {
            // The shipped weights; the description pads conv1 by 4096 on each side: 32 x 8224 x 8224 activations
            // (8.7 GB) per image.
            const auto dir = variant("padded_classifier");
            std::string desc = hostile::read_text(model / "classifier.json");
            const auto at = desc.find("\"padding\": 1");
            desc.replace(at, 12, "\"padding\": 4096");
            fs::remove(dir / "classifier.json");
            hostile::write_text(dir / "classifier.json", desc);
        }
        {
            const auto dir = variant("absurd_learned");
            std::string learned = hostile::read_text(model / "learned_c3.json");
            // the first number of the first non-null weight row
            const auto weights = learned.find("\"weights\"");
            auto at = learned.find_first_of("-0123456789", learned.find("[", learned.find("[", learned.find("[", weights) + 1) + 1));
            const auto end = learned.find_first_of(",]", at);
            learned.replace(at, end - at, "1e30");
            fs::remove(dir / "learned_c3.json");
            hostile::write_text(dir / "learned_c3.json", learned);
        }

        // The learned weights: none at all, and a calibration cut in half.
        const auto no_learned = variant("no_learned");
        for (const auto& entry : fs::directory_iterator(no_learned))
            if (entry.path().filename().string().starts_with("learned_")) fs::remove(entry.path());
        const auto lying_learned = variant("lying_learned");
        const std::string learned = hostile::read_text(model / "learned_c3.json");
        fs::remove(lying_learned / "learned_c3.json");
        hostile::write_text(lying_learned / "learned_c3.json", learned.substr(0, learned.size() / 2));
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "hostile_make_models: %s\n", e.what());
        return 1;
    }
}
