"""The PKM feed-forward and SwitchHead attention baselines: references, gradients, caching, batching."""
import torch

from peer_model.attention import Attention, rope_tables
from peer_model.baselines.pkm import ProductKeyMemory
from peer_model.baselines.switchhead import SwitchHeadAttention
from peer_model.batching import BatchDecoder
from peer_model.config import ModelConfig, PKMConfig, SwitchHeadConfig
from peer_model.generate import SamplingParams, generate
from peer_model.model import PEERTransformer
from test_generate import greedy_without_cache

D = 32


def sh_config(**switchhead) -> ModelConfig:
    return ModelConfig(d_model=D, n_layers=2, n_heads=2, d_ff=64, max_seq_len=32, ffw="dense", attention="switchhead",
                       switchhead=SwitchHeadConfig(**switchhead))


# ---- PKM --------------------------------------------------------------------------------------------


def pkm_layer() -> ProductKeyMemory:
    torch.manual_seed(0)
    return ProductKeyMemory(D, PKMConfig(num_memories=16 * 16, heads=2, top_k=4, d_key=16))


def test_pkm_equals_brute_force_over_all_product_keys():
    pkm = pkm_layer().double().eval()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    out = pkm(x)
    assert out.shape == x.shape
    cfg, side, half = pkm.config, 16, pkm.config.d_key // 2
    q = pkm.query_norm(pkm.query(x.view(-1, D))).view(-1, cfg.heads, cfg.d_key)  # (M, heads, d_key)
    i, j = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    keys = torch.cat([pkm.sub_keys1[i.flatten()], pkm.sub_keys2[j.flatten()]], dim=1)  # key of id i * side + j
    assert keys.shape == (side * side, 2 * half)
    scores, ids = (q @ keys.t()).topk(cfg.top_k, dim=-1)  # (M, heads, k)
    expected = (torch.softmax(scores, dim=-1).unsqueeze(-1) * pkm.values[ids]).sum((1, 2))
    torch.testing.assert_close(out, expected.view_as(x), rtol=1e-5, atol=1e-5)


def test_pkm_gradients_reach_query_sub_keys_and_only_the_selected_values():
    pkm = pkm_layer().train()
    x = torch.randn(2, 5, D, requires_grad=True)
    with torch.no_grad():
        _, ids = pkm.route(x.view(-1, D))  # same batch statistics as the forward below
    (pkm(x) * torch.randn(2, 5, D)).sum().backward()
    for param in (x, pkm.query.weight, pkm.sub_keys1, pkm.sub_keys2, pkm.values):
        assert param.grad is not None and param.grad.abs().sum() > 0
    touched = pkm.values.grad.abs().sum(1).nonzero().flatten()
    assert touched.tolist() == ids.unique().tolist()


def test_a_pkm_model_trains():
    torch.manual_seed(0)
    config = ModelConfig(d_model=D, n_layers=2, n_heads=2, d_ff=64, max_seq_len=32, peer_layers=[1], ffw="pkm",
                         pkm=PKMConfig(num_memories=16 * 16, heads=2, top_k=4, d_key=16))
    model = PEERTransformer(config)
    assert isinstance(model.blocks[1].ffw, ProductKeyMemory) and model.aux_loss() is None
    tokens = torch.randint(0, 256, (2, 12))
    logits = model(tokens)
    assert logits.shape == (2, 12, config.vocab_size) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    assert model.blocks[1].ffw.values.grad.abs().sum() > 0


# ---- SwitchHead -------------------------------------------------------------------------------------


def test_switchhead_with_one_expert_is_multi_head_attention():
    torch.manual_seed(0)
    config = sh_config(n_heads=2, head_dim=D // 2, num_experts=1, top_k=1)
    mha, sh = Attention(config), SwitchHeadAttention(config)
    H, hd = config.n_heads, D // config.n_heads
    with torch.no_grad():
        wq, wk, wv = mha.qkv.weight.split(D)  # rows [q; k; v], each (H * hd, d)
        sh.q_proj.weight.copy_(wq)
        sh.k_proj.weight.copy_(wk)
        sh.v_experts.copy_(wv.view(H, hd, D).transpose(1, 2).unsqueeze(1))  # (H, 1, d, hd)
        sh.o_experts.copy_(mha.out.weight.view(D, H, hd).permute(1, 2, 0).unsqueeze(1))  # (H, 1, hd, d)
    cos, sin = rope_tables(hd, 10, config.rope_theta)
    x = torch.randn(2, 10, D)
    torch.testing.assert_close(sh(x, cos, sin), mha(x, cos, sin), rtol=1e-5, atol=1e-5)


def test_switchhead_selects_top_k_experts_and_gradients_reach_every_part():
    torch.manual_seed(0)
    config = sh_config(n_heads=2, head_dim=8, num_experts=4, top_k=2)
    sh = SwitchHeadAttention(config)
    x = torch.randn(2, 10, D)
    for selection in (sh.sel_v, sh.sel_o):
        gates = sh.gates(x, selection)
        assert gates.shape == (2, 10, 2, 4)
        assert ((gates > 0).sum(-1) == 2).all()  # exactly top_k experts per token and head
        scores = torch.sigmoid(selection(x).view(2, 10, 2, 4))
        torch.testing.assert_close(gates, torch.where(gates > 0, scores, 0.0))  # kept ones: unnormalised sigmoid
        assert (gates.amax(-1) == scores.amax(-1)).all()
    cos, sin = rope_tables(8, 10, config.rope_theta)
    (sh(x, cos, sin) * torch.randn(2, 10, D)).sum().backward()
    for param in (sh.q_proj.weight, sh.k_proj.weight, sh.v_experts, sh.o_experts, sh.sel_v.weight, sh.sel_o.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert (sh.v_experts.grad.flatten(2).abs().sum(-1) > 0).all()  # every expert was picked somewhere


def switchhead_model() -> PEERTransformer:
    torch.manual_seed(0)
    model = PEERTransformer(sh_config(n_heads=2, head_dim=8, num_experts=4, top_k=2))
    assert isinstance(model.blocks[0].attn, SwitchHeadAttention)
    with torch.no_grad():  # large random weights: an untrained model would just repeat the last token
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.5)
    return model.double().eval()  # float64: no near-tie in an argmax or a top-k flips between the paths


def test_switchhead_cached_and_batched_decoding_equal_recomputation():
    model = switchhead_model()
    greedy = SamplingParams(max_tokens=8, temperature=0)
    prompts = [[104, 105], [97, 98, 99, 100, 101, 102, 103]]
    alone = [[s.token_id for s in generate(model, p, greedy)] for p in prompts]
    assert alone == [greedy_without_cache(model, p, 8) for p in prompts]
    assert all(len(set(tokens)) > 2 for tokens in alone)  # the completions depend on their context
    decoder = BatchDecoder(model, capacity=2)
    rows = [decoder.add(p, greedy) for p in prompts]
    got = {0: [], 1: []}
    while len(decoder):
        for sequence, step in decoder.step():
            got[rows.index(sequence)].append(step.token_id)
    assert [got[0], got[1]] == alone
